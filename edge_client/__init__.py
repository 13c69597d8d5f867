"""Edge client: numpy-only runtime that encodes images to AlignedVQ payloads (no torch import)."""
