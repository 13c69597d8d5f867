"""``edge-client``: ask a gateway about an image from the command line.

    edge-client ask photo.jpg "what color is the shape?" --gateway http://127.0.0.1:8000 --json
    edge-client ask photo.jpg "what shape is this?" --cloud-only
    edge-client ask photo.jpg "describe the scene" --stream --max-new-tokens 64
    edge-client chat photo.jpg              # one question per line; the features are sent once
    edge-client bundle-info ~/.cache/alignedvq/bundles/<sha256>.bundle

Exit codes: 0 answered; 2 the request was refused or could not be built (a 4xx reply, a bad
image, bundle or argument; typer's own usage errors also exit 2); 3 the gateway failed or could
not be reached (a 5xx reply, connection refused, timeout), so trying again later may help. ``chat``
exits 0 when every question was answered, else with the code of its last failure.

Words of a question the model's vocabulary cannot spell are reported on stderr (and, with
``--json``, as ``unknown_words``): the model answered without them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from .bundle import EdgeBundle
from .client import DEFAULT_CACHE_DIR, DEFAULT_MODEL, Answer, EdgeClient
from .errors import AlignedVQError, GatewayError
from .protocol import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS

__all__ = ["EXIT_CLIENT", "EXIT_GATEWAY", "app"]

EXIT_CLIENT = 2
EXIT_GATEWAY = 3

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ask an AlignedVQ gateway about an image.")

Gateway = Annotated[str, typer.Option(envvar="VQA_GATEWAY_URL", help="gateway base URL")]
ApiKey = Annotated[str | None, typer.Option(envvar="VQA_API_KEY", help="bearer token")]
Model = Annotated[str | None, typer.Option(help=f"model name (default: the bundle's, else {DEFAULT_MODEL})")]
Bundle = Annotated[Path | None, typer.Option(help="edge bundle file (default: download)")]
CacheDir = Annotated[Path, typer.Option(help="where downloaded bundles are kept")]
CloudOnly = Annotated[bool, typer.Option("--cloud-only", help="send a JPEG-90 instead")]
MaxNewTokens = Annotated[int, typer.Option(min=1, max=MAX_NEW_TOKENS)]
Timeout = Annotated[float, typer.Option(min=0.001, help="seconds per HTTP attempt")]
Retries = Annotated[int, typer.Option(min=0, help="retries on 429/5xx/timeouts")]
Threads = Annotated[int, typer.Option(min=1, envvar="VQA_EDGE_THREADS", help="BLAS threads for the encode")]


def _exit_code(error: Exception) -> int:
    gateway_side = isinstance(error, GatewayError) and (error.status is None or error.status >= 500)
    return EXIT_GATEWAY if gateway_side else EXIT_CLIENT


def _report(error: Exception, as_json: bool = False) -> None:
    """Report ``error``: on stderr, or with ``--json`` one JSON object on stdout, shaped like the
    gateway's error bodies."""
    code = getattr(error, "code", "bad_argument")
    if as_json:
        typer.echo(json.dumps({"error": {"code": code, "message": str(error)}}))
    else:
        typer.echo(f"edge-client: error [{code}]: {error}", err=True)


def _fail(error: Exception, as_json: bool = False) -> NoReturn:
    """Report ``error`` and exit 3 for gateway-side failures, 2 for everything else."""
    _report(error, as_json)
    raise typer.Exit(_exit_code(error))


def _print_token(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note_unknown(answer: Answer) -> None:
    if answer.unknown_words:
        words = ", ".join(repr(word) for word in answer.unknown_words)
        them = "it" if len(answer.unknown_words) == 1 else "them"
        typer.echo(
            f"edge-client: note: the model does not know {words}; it answered without {them}", err=True
        )


def _client(
    gateway: str,
    api_key: str | None,
    model: str | None,
    bundle: Path | None,
    cache_dir: Path,
    timeout: float,
    retries: int,
    threads: int,
) -> EdgeClient:
    return EdgeClient(
        gateway,
        api_key=api_key,
        model=model,
        bundle=bundle,
        cache_dir=cache_dir,
        timeout=timeout,
        retries=retries,
        threads=threads,
    )


@app.command()
def ask(
    image: Annotated[Path, typer.Argument(help="image file (JPEG, PNG, WebP ...)")],
    question: Annotated[str, typer.Argument(help="the question, in quotes")],
    gateway: Gateway = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
    model: Model = None,
    bundle: Bundle = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    cloud_only: CloudOnly = False,
    stream: Annotated[bool, typer.Option("--stream", help="print the answer as it is generated")] = False,
    max_new_tokens: MaxNewTokens = DEFAULT_MAX_NEW_TOKENS,
    timeout: Timeout = 30.0,
    retries: Retries = 3,
    threads: Threads = 1,
) -> None:
    """Encode IMAGE at the edge (or send it whole with --cloud-only) and print the answer."""
    # With --json the answer comes in the object: streamed, it is only timed (first_token_ms).
    on_token = (lambda _: None) if as_json else _print_token
    try:
        with _client(gateway, api_key, model, bundle, cache_dir, timeout, retries, threads) as client:
            result = client.ask(
                image,
                question,
                cloud_only=cloud_only,
                max_new_tokens=max_new_tokens,
                on_token=on_token if stream else None,
            )
    except (AlignedVQError, ValueError) as error:
        if stream and not as_json:
            typer.echo()
        _fail(error, as_json)
    if as_json:
        typer.echo(json.dumps(asdict(result)))
        _note_unknown(result)
        return
    mode = "cloud-only JPEG" if result.cloud_only else "features"
    typer.echo("" if stream else result.answer)
    typer.echo(
        f"  [{result.model}, {mode}: {result.request_bytes} B sent, {result.bits_per_token:.2f} bits/token, "
        f"edge {result.edge_ms:.1f} ms, round trip {result.latency_ms:.1f} ms, id {result.request_id}]"
    )
    _note_unknown(result)


@app.command()
def chat(
    image: Annotated[Path, typer.Argument(help="image file (JPEG, PNG, WebP ...)")],
    gateway: Gateway = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
    model: Model = None,
    bundle: Bundle = None,
    cache_dir: CacheDir = DEFAULT_CACHE_DIR,
    cloud_only: CloudOnly = False,
    max_new_tokens: MaxNewTokens = DEFAULT_MAX_NEW_TOKENS,
    timeout: Timeout = 30.0,
    retries: Retries = 3,
    threads: Threads = 1,
) -> None:
    """Ask several questions about IMAGE, one per line of input, answers streamed as they come.

    The features are sent with the first question; later ones name them by image_ref and carry
    the conversation so far (re-sent by themselves if the gateway no longer holds them).
    """
    interactive = sys.stdin.isatty()
    failure = 0
    try:
        client = _client(gateway, api_key, model, bundle, cache_dir, timeout, retries, threads)
        conversation = client.conversation(image, cloud_only=cloud_only)
    except (AlignedVQError, ValueError) as error:
        _fail(error)
    with client:
        while True:
            if interactive:
                typer.echo("> ", nl=False, err=True)
            line = sys.stdin.readline()
            if not line:
                break
            question = line.strip()
            if not question:
                continue
            try:
                answer = conversation.ask(question, max_new_tokens=max_new_tokens, on_token=_print_token)
            except (AlignedVQError, ValueError) as error:
                typer.echo()
                _report(error)
                failure = _exit_code(error)
                continue
            how = "image_ref" if answer.bits_per_token == 0 else ("JPEG" if cloud_only else "features")
            typer.echo()
            typer.echo(
                f"  [{answer.request_bytes} B sent ({how}), round trip {answer.latency_ms:.0f} ms]", err=True
            )
            _note_unknown(answer)
    raise typer.Exit(failure)


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
