"""The `promptcache` command line: demo, chat, serve, and cache inspection. Prints with rich.

Parses arguments and renders tables; the work is done by the library.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Never prefill the same tokens twice.")
console = Console()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@app.command()
def demo(
    max_tokens: int = typer.Option(24, help="Tokens to generate per answer."),
    cache_dir: Optional[Path] = typer.Option(None, help="Disk cache directory (default: a new temporary one)."),
) -> None:
    """Ask three questions over one long system prompt, then hit the disk cache from a fresh process."""
    from promptcache.demo import run_demo

    with console.status("Loading SmolLM2-135M and asking questions..."):
        rows, totals = run_demo(max_tokens=max_tokens, cache_dir=str(cache_dir) if cache_dir else None)
    cold = rows[0].ttft_ms
    table = Table(title="promptcache demo: time to first token, cold vs cached")
    for col in ("run", "question", "prompt tokens", "reused", "from", "TTFT", "speed-up"):
        numeric = col in ("prompt tokens", "reused", "TTFT", "speed-up")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=numeric or col == "run")
    for r in rows:
        table.add_row(
            r.run, r.question, str(r.prompt_tokens), str(r.tokens_reused), r.source,
            f"{r.ttft_ms:,.0f} ms", f"{cold / r.ttft_ms:,.1f}x" if r.ttft_ms else "-",
        )
    console.print(table)
    console.print(f"[bold]Answer:[/bold] {rows[0].answer}")
    console.print(
        f"Disk cache: {totals['cache_entries']} chunks, {_fmt_bytes(totals['cache_bytes'])} in {totals['cache_dir']}"
    )


@app.command()
def chat(
    model: Optional[Path] = typer.Option(None, help="A GGUF file (default: SmolLM2-135M-Instruct)."),
    system: str = typer.Option("You are a helpful assistant.", help="System prompt."),
    max_tokens: int = typer.Option(256),
    temperature: float = typer.Option(0.7),
) -> None:
    """Talk to the model; every turn reuses the conversation's cached prefix."""
    from promptcache import LLM

    llm = LLM(model)
    messages = [{"role": "system", "content": system}]
    console.print("[dim]Empty line or Ctrl-D to quit.[/dim]")
    while True:
        try:
            user = console.input("[bold green]you> [/bold green]")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        reply = []
        for piece in llm.chat(messages, max_tokens=max_tokens, temperature=temperature, stream=True):
            console.print(piece, end="", markup=False, highlight=False)
            reply.append(piece)
        s = llm.last_stats
        console.print(f"\n[dim]{s.tokens_reused}/{s.prompt_tokens} prompt tokens reused ({s.source}), "
                      f"first token in {s.ttft_ms:.0f} ms[/dim]")
        messages.append({"role": "assistant", "content": "".join(reply)})
    llm.close()


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the cache does.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    app()
