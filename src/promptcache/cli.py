"""The `promptcache` command line: demo, chat, serve, and cache inspection. Prints with rich.

Parses arguments and renders tables; the work is done by the library.
"""

from __future__ import annotations

import enum
import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from promptcache.config import ARTEFACT_CACHES
from promptcache.server.settings import (
    ServerSettings,
    command_line_options,
    settings_from_command_line,
)

if TYPE_CHECKING:
    from promptcache.manager import CacheManager


app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Never prefill the same tokens twice."
)
console = Console()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _short(question: str, width: int = 16) -> str:
    return question if len(question) <= width else question[: width - 1] + "…"


@app.command()
def demo(
    max_tokens: int = typer.Option(24, help="Tokens to generate per answer."),
    cache_dir: Optional[Path] = typer.Option(
        None, help="Disk cache directory (default: a new temporary one)."
    ),
) -> None:
    """Ask three questions over one long system prompt, then hit the disk cache from a fresh process."""
    from promptcache.demo import run_demo

    with console.status("Loading SmolLM2-135M and asking questions..."):
        rows, totals = run_demo(
            max_tokens=max_tokens, cache_dir=str(cache_dir) if cache_dir else None
        )
    cold = rows[0].ttft_ms
    table = Table(title="promptcache demo: time to first token, cold vs cached", expand=False)
    for col in ("run", "question", "tokens", "reused", "from", "TTFT", "faster"):
        numeric = col in ("tokens", "reused", "TTFT", "faster")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=True)
    for r in rows:
        table.add_row(
            r.run,
            _short(r.question),
            str(r.prompt_tokens),
            str(r.tokens_reused),
            r.source,
            f"{r.ttft_ms:,.0f} ms",
            f"{cold / r.ttft_ms:,.1f}x" if r.ttft_ms else "-",
        )
    console.print(table)
    console.print(f"[bold]Answer:[/bold] {rows[0].answer}")
    console.print(
        f"Disk cache: {totals['cache_entries']} segments, {_fmt_bytes(totals['cache_bytes'])} in {totals['cache_dir']}"
    )


@app.command()
def chat(
    model: Optional[Path] = typer.Option(
        None, help="A GGUF file (default: SmolLM2-135M-Instruct)."
    ),
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
        for piece in llm.chat(
            messages, max_tokens=max_tokens, temperature=temperature, stream=True
        ):
            console.print(piece, end="", markup=False, highlight=False)
            reply.append(piece)
        s = llm.last_stats
        console.print(
            f"\n[dim]{s.tokens_reused}/{s.prompt_tokens} prompt tokens reused ({s.source}), "
            f"first token in {s.ttft_ms:.0f} ms[/dim]"
        )
        messages.append({"role": "assistant", "content": "".join(reply)})
    llm.close()


# -- serve: its options are made from ServerSettings' fields, as `python -m promptcache.server`'s are ----


def _serve(**options: Any) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, ...) over one shared prefix cache.

    Every option is also a PROMPTCACHE_<OPTION> variable and a key of the --config file.
    """
    from promptcache.errors import ConfigError
    from promptcache.server import run

    try:
        settings = _serve_settings(options)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    run(settings)


def _serve_parameters() -> list[inspect.Parameter]:
    """typer reads a command's options from its signature: one keyword per ServerSettings field."""
    parameters = []
    for option in command_line_options():
        if option.kind is bool:
            info = typer.Option(f"{option.flag}/{option.negative_flag}", help=option.help)
        else:
            info = typer.Option(option.flag, help=option.help)
        # Every typer release takes choices as an Enum (Literal only the newest); _serve unwraps it.
        kind = (
            enum.Enum(option.field, {c: c for c in option.choices})
            if option.choices
            else option.kind
        )
        parameters.append(
            inspect.Parameter(
                option.field,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[kind | None, info],
            )
        )
    return parameters


_serve.__signature__ = inspect.Signature(_serve_parameters())  # type: ignore[attr-defined]
app.command("serve")(_serve)


def serve_settings(argv: list[str]) -> ServerSettings:
    """The settings `promptcache serve ARGV` would serve with, parsed by the same command, without
    serving. Raises ConfigError for bad values and click.UsageError for an unknown option."""
    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    with command.make_context("serve", list(argv)) as ctx:
        return _serve_settings(ctx.params)


def _serve_settings(options: dict[str, Any]) -> ServerSettings:
    values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in options.items()}
    return settings_from_command_line(values)


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the cache does."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


# -- cache tiers: stats, gc, inspect, clear (settings: promptcache.config.CacheConfig) ----------------


def _cache_manager(config: Path | None) -> CacheManager:
    """The tiers the settings describe (file, then PROMPTCACHE_* environment), without a cleanup thread."""
    from promptcache.config import CacheConfig
    from promptcache.errors import ConfigError, StoreUnavailableError
    from promptcache.manager import CacheManager

    try:
        return CacheManager(CacheConfig(config_file=config), cleanup=False)
    except (ConfigError, StoreUnavailableError) as exc:
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None


_CONFIG_HELP = "A TOML/YAML file of cache settings (default: $PROMPTCACHE_CONFIG, then PROMPTCACHE_* variables)."
_ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help=_CONFIG_HELP)]


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _tier_table(name: str, tier: dict) -> Table:
    table = Table(title=f"{name} tier", show_header=False, title_justify="left")
    table.add_column("setting")
    table.add_column("value", justify="right")
    if tier.get("error"):
        table.add_row("error", str(tier["error"]))
        return table
    nbytes = int(tier.get("bytes", 0))
    table.add_row("entries", str(tier["entries"]) if int(tier["entries"]) >= 0 else "unknown")
    table.add_row("bytes", _fmt_bytes(nbytes) if nbytes >= 0 else "unknown")
    table.add_row("capacity", _fmt_bytes(int(tier["capacity_bytes"])))
    table.add_row("usage", f"{tier['usage']:.1%}")
    table.add_row("policy", str(tier.get("policy", "-")))
    table.add_row("evictions (this process)", str(tier["eviction_count"]))
    for extra in ("compression", "path", "url", "namespace"):
        if extra in tier:
            table.add_row(extra, str(tier[extra]))
    if name == "redis":
        table.add_row("reachable", "yes" if tier.get("available") else "[red]no[/red]")
    if name == "memory":
        table.caption = "RAM is per process: a new process starts empty"
    return table


def _artefact_table(name: str, row: dict) -> Table:
    table = Table(title=name, show_header=False, title_justify="left")
    table.add_column("setting")
    table.add_column("value", justify="right")
    if row.get("error"):
        table.add_row("error", str(row["error"]))
    else:
        table.add_row("entries", str(row["entries"]))
        table.add_row("bytes", _fmt_bytes(int(row["bytes"])))
        table.add_row("capacity", _fmt_bytes(int(row["capacity_bytes"])))
        table.add_row("usage", f"{row['usage']:.1%}")
        table.add_row("policy", str(row.get("policy", "-")))
        table.add_row("evictions (this process)", str(row["eviction_count"]))
    table.add_row("path", str(row.get("path", "-")))
    return table


_SOURCES = ("live", "memory", "disk", "redis")


def _server_stats(urls: list[str], api_key: str | None) -> dict[str, Any]:
    """Each running server's /v1/cache/stats (an "error" entry for one that does not answer)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out: dict[str, Any] = {}
    for url in urls:
        try:
            r = httpx.get(f"{url.rstrip('/')}/v1/cache/stats", headers=headers, timeout=10)
            r.raise_for_status()
            out[url] = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            out[url] = {"error": str(exc)}
    return out


def _servers_table(report: dict[str, Any]) -> Table:
    """Per server: where reused prompt tokens came from, and the KV events it published."""
    table = Table(title="servers (tokens reused by source; KV events)", title_justify="left")
    columns = ("server", "prompt tokens", *_SOURCES, "evaluated", "batches", "stored", "removed")
    for column in (*columns, "cleared", "last seq"):
        table.add_column(column, justify="left" if column == "server" else "right")
    for url, row in report.items():
        if "error" in row:
            table.add_row(url, f"[red]{row['error']}[/red]", *[""] * 10)
            continue
        reused = row.get("tokens_reused_by_source", {})
        events = row.get("kv_events") or {}
        counts = events.get("events", {})
        table.add_row(
            url,
            f"{row['tokens']['prompt_tokens']:,}",
            *(f"{reused.get(source, 0):,}" for source in _SOURCES),
            f"{row['tokens']['tokens_evaluated']:,}",
            *(
                (
                    str(events["batches"]),
                    str(events["blocks_stored"]),
                    str(events["blocks_removed"]),
                    str(counts.get("AllBlocksCleared", 0)),
                    str(events["last_seq"]),
                )
                if events
                else ("off", "", "", "", "")
            ),
        )
    return table


@app.command()
def stats(
    config: _ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
    server: Annotated[
        Optional[list[str]],
        typer.Option(
            "--server",
            help="A running server's URL (repeat for a fleet): show where its reused tokens came "
            "from and the KV events it published, instead of this machine's tiers.",
        ),
    ] = None,
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", help="The servers' --api-key, if any.")
    ] = None,
) -> None:
    """Show each cache tier and artefact cache: entries, bytes, capacity, evictions (the RAM tier is per process)."""
    import json

    from promptcache.engines.llama_cpp import probe

    if server:
        servers = _server_stats(server, api_key)
        if as_json:
            console.print_json(json.dumps(servers, default=str))
        else:
            console.print(_servers_table(servers))
        return
    with _cache_manager(config) as manager:
        report = manager.stats()
    # How exact mode reuses on this machine, per model the probe measured (LLM.exact_strategy).
    # One record per model and kernel settings (flash_attn, threads; None in records written
    # before they were kept); "probe" is the record's key (exactness.py's probe_key).
    report["exact"] = [
        {
            "probe": key,
            **{
                k: row.get(k)
                for k in ("model", "strategy", "exact_batch", "chunk", "flash_attn", "threads")
            },
        }
        for key, row in probe.records().items()
    ]
    if as_json:
        console.print_json(json.dumps(report, default=str))
        return
    for name, tier in report["tiers"].items():
        console.print(_tier_table(name, tier))
    for name, row in report["artefacts"].items():
        console.print(_artefact_table(name, row))
    if report["exact"]:
        table = Table(title="exact mode on this machine (probed per model)", title_justify="left")
        for column in ("model", "flash_attn", "threads", "strategy", "exact batch", "chunk C"):
            table.add_column(column)
        for row in report["exact"]:
            table.add_row(
                str(row["model"]),
                "-" if row["flash_attn"] is None else str(row["flash_attn"]),
                str(row["threads"] or "-"),
                str(row["strategy"] or "-"),
                str(row["exact_batch"]),
                str(row["chunk"] or "-"),
            )
        console.print(table)
    missing = [name for name in ARTEFACT_CACHES if name not in report["artefacts"]]
    if missing:
        console.print(f"[dim]Not created yet: {', '.join(missing)}.[/dim]")


@app.command()
def gc(config: _ConfigOption = None) -> None:
    """Enforce max_age and capacity in every tier and artefact cache now, and reconcile files and Redis keys with their indexes."""
    with _cache_manager(config) as manager:
        with console.status("Collecting garbage..."):
            counts = manager.run_cleanup()
    table = Table(title="promptcache gc")
    table.add_column("tier or cache")
    table.add_column("removed or fixed", justify="left")
    for tier, tier_counts in counts.items():
        if "error" in tier_counts:
            table.add_row(tier, f"[red]{tier_counts['error']}[/red]")
        else:
            table.add_row(
                tier, ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in tier_counts.items())
            )
    console.print(table)


@app.command()
def inspect(
    config: _ConfigOption = None,
    limit: Annotated[int, typer.Option(help="Entries per tier, most recently used first.")] = 20,
    tier: Annotated[
        str | None,
        typer.Option(
            help="Only this tier (memory, disk, redis) or artefact cache (model_cache, training_cache, system_cache)."
        ),
    ] = None,
) -> None:
    """List cached entries and artefacts: model fingerprint, tokens, bytes, age, tier (reading an entry refreshes it)."""
    with _cache_manager(config) as manager:
        entries = manager.inspect(limit, tier=tier)
    table = Table(title="promptcache entries")
    for col in ("tier", "cache", "model", "tokens", "bytes", "age", "key"):
        numeric = col in ("tokens", "bytes", "age")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=True)
    for e in entries:
        table.add_row(
            e.tier,
            e.cache or "-",
            e.fingerprint[:12] or "-",
            str(e.tokens) if e.tokens is not None else "-",
            _fmt_bytes(e.bytes),
            _fmt_age(e.age_s),
            e.key if len(e.key) <= 28 else e.key[:25] + "...",
        )
    console.print(table)
    if not entries:
        console.print("[dim]No entries.[/dim]")


@app.command()
def clear(
    config: _ConfigOption = None,
    cache: Annotated[
        str | None,
        typer.Option(
            help="Only this named cache, or an artefact cache: model_cache, training_cache, "
            "system_cache (default: every entry of every tier and artefact cache)."
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove cached entries from every tier and artefact cache (for every process sharing them)."""
    with _cache_manager(config) as manager:
        if cache in ARTEFACT_CACHES:
            places = [cache]
        else:
            places = [t.name for t in manager.store.tiers if t.name != "memory"]
            if cache is None:
                places += list(manager.artefact_stores())
        where = ", ".join(places) or "nothing"
        what = f"cache {cache!r}" if cache else "every entry"
        if not yes and not typer.confirm(f"Remove {what} from {where}?"):
            raise typer.Exit(1)

        def count() -> tuple[int, int]:
            keys = 0 if cache in ARTEFACT_CACHES else len(manager.store)
            stores = manager.artefact_stores()
            return keys, sum(len(s.entries()) for k, s in stores.items() if cache in (None, k))

        keys_before, artefacts_before = count()
        try:
            manager.clear(cache)
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]", soft_wrap=True)
            raise typer.Exit(2) from None
        keys_after, artefacts_after = count()
    removed, gone = keys_before - keys_after, artefacts_before - artefacts_after
    parts = [] if cache in ARTEFACT_CACHES else [f"{removed} key{'' if removed == 1 else 's'}"]
    if cache is None or cache in ARTEFACT_CACHES:
        parts.append(f"{gone} artefact{'' if gone == 1 else 's'}")
    console.print(f"Removed {' and '.join(parts)} ({what}) from {where}.")


if __name__ == "__main__":
    app()
