"""``edge-client``: ask a gateway about an image from the command line.

    edge-client ask photo.jpg "what color is the shape?" --gateway http://127.0.0.1:8000 --json
    edge-client ask photo.jpg "what shape is this?" --cloud-only
    edge-client bundle-info ~/.cache/alignedvq/bundles/<sha256>.bundle

Exit codes: 0 answered; 2 the request was refused or could not be built (a 4xx reply, a bad
image, bundle or argument; typer's own usage errors also exit 2); 3 the gateway failed or could
not be reached (a 5xx reply, connection refused, timeout), so trying again later may help.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from .bundle import EdgeBundle
from .client import DEFAULT_CACHE_DIR, DEFAULT_MODEL, EdgeClient
from .errors import AlignedVQError, GatewayError

__all__ = ["EXIT_CLIENT", "EXIT_GATEWAY", "app"]

EXIT_CLIENT = 2
EXIT_GATEWAY = 3

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ask an AlignedVQ gateway about an image.")


def _fail(error: Exception, as_json: bool = False) -> NoReturn:
    """Report ``error`` (stderr, or with ``--json`` one JSON object on stdout, shaped like the
    gateway's error bodies) and exit 3 for gateway-side failures, 2 for everything else."""
    gateway_side = isinstance(error, GatewayError) and (error.status is None or error.status >= 500)
    code = getattr(error, "code", "bad_argument")
    if as_json:
        typer.echo(json.dumps({"error": {"code": code, "message": str(error)}}))
    else:
        typer.echo(f"edge-client: error [{code}]: {error}", err=True)
    raise typer.Exit(EXIT_GATEWAY if gateway_side else EXIT_CLIENT)


@app.command()
def ask(
    image: Annotated[Path, typer.Argument(help="image file (JPEG, PNG, WebP ...)")],
    question: Annotated[str, typer.Argument(help="the question, in quotes")],
    gateway: Annotated[
        str, typer.Option(envvar="VQA_GATEWAY_URL", help="gateway base URL")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="VQA_API_KEY", help="bearer token")] = None,
    model: Annotated[
        str | None, typer.Option(help=f"model name (default: the bundle's, else {DEFAULT_MODEL})")
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="edge bundle file (default: download)")] = None,
    cache_dir: Annotated[Path, typer.Option(help="where downloaded bundles are kept")] = DEFAULT_CACHE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    cloud_only: Annotated[bool, typer.Option("--cloud-only", help="send a JPEG-90 instead")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=64)] = 8,
    timeout: Annotated[float, typer.Option(min=0.001, help="seconds per HTTP attempt")] = 30.0,
    retries: Annotated[int, typer.Option(min=0, help="retries on 429/5xx/timeouts")] = 3,
    threads: Annotated[
        int, typer.Option(min=1, envvar="VQA_EDGE_THREADS", help="BLAS threads for the encode")
    ] = 1,
) -> None:
    """Encode IMAGE at the edge (or send it whole with --cloud-only) and print the answer."""
    try:
        with EdgeClient(
            gateway,
            api_key=api_key,
            model=model,
            bundle=bundle,
            cache_dir=cache_dir,
            timeout=timeout,
            retries=retries,
            threads=threads,
        ) as client:
            result = client.ask(image, question, cloud_only=cloud_only, max_new_tokens=max_new_tokens)
    except (AlignedVQError, ValueError) as error:
        _fail(error, as_json)
    if as_json:
        typer.echo(json.dumps(asdict(result)))
        return
    mode = "cloud-only JPEG" if result.cloud_only else "features"
    typer.echo(
        f"{result.answer}\n"
        f"  [{result.model}, {mode}: {result.request_bytes} B sent, {result.bits_per_token:.2f} bits/token, "
        f"edge {result.edge_ms:.1f} ms, round trip {result.latency_ms:.1f} ms, id {result.request_id}]"
    )


@app.command("bundle-info")
def bundle_info(
    path: Annotated[Path, typer.Argument(help="edge bundle file")],
    tensors: Annotated[bool, typer.Option(help="list every tensor's dtype and shape")] = False,
) -> None:
    """Verify an edge bundle and print its metadata as JSON."""
    try:
        info = EdgeBundle.load(path).describe()
    except AlignedVQError as error:
        _fail(error)
    if not tensors:
        info.pop("tensors")
    typer.echo(json.dumps(info, indent=2, sort_keys=True))


if __name__ == "__main__":
    app()
