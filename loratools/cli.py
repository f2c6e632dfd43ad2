"""The ``loratools`` command. Each command parses its arguments, calls one library function and
renders its result; errors are turned into one message and exit code 1 (usage errors: 2).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .dtypes import DTYPE_CHOICES
from .errors import AdapterNotFoundError, LoraToolsError, NotAnAdapterError
from .formats import READABLE, WRITABLE
from .options import LAYOUTS


class LoraToolsGroup(click.Group):
    """Turns library errors into messages: ``Error: <what>`` + the hint, exit 1, no traceback.

    ``--debug`` (or LORATOOLS_DEBUG=1) lets the traceback through.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LoraToolsError as e:
            if ctx.meta.get("loratools.debug"):
                raise
            raise _Failure(str(e)) from None
        except BrokenPipeError:  # `loratools info … | head`: the reader has what it wanted
            _quiet_broken_pipe()
        except OSError as e:  # disk full, permission denied… while reading or writing
            if ctx.meta.get("loratools.debug"):
                raise
            raise _Failure(describe_os_error(e)) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # a bug: still one message, and the way to the traceback
            if ctx.meta.get("loratools.debug"):
                raise
            raise _Failure(f"internal error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}\n"
                           "This is a bug in loratools; please report it with the command you ran and the output "
                           "of the same command with --debug.") from None


# what each errno means for the user: what failed, and what to do (the same shape as every message)
_OS_ADVICE = {
    errno.ENOSPC: "The disk is full. Free space next to OUT (the output is written there first), or choose OUT on "
                  "another disk.",
    errno.EDQUOT: "The disk quota is exhausted. Free space, or choose OUT elsewhere.",
    errno.EACCES: "Permission denied. Check that you may read the inputs and write next to OUT.",
    errno.EPERM: "The operation is not permitted here. Check the permissions of the inputs and of OUT's folder.",
    errno.EROFS: "That file system is read-only. Choose OUT on a writable disk.",
    errno.EEXIST: "Something of that name already exists. Choose another OUT, or remove it first.",
    errno.EBUSY: "The file or folder is in use (a mount point, or open elsewhere). Choose another OUT.",
    errno.ENOTDIR: "A part of the path is a file, not a folder. Check the path.",
    errno.EISDIR: "A folder was found where a file was expected. Check the path.",
    errno.ENAMETOOLONG: "The path is too long for the file system. Choose a shorter OUT.",
    errno.EMFILE: "Too many files are open. Raise the limit (ulimit -n) and retry.",
    errno.EIO: "The disk reported an input/output error. Check the disk; the inputs may be damaged.",
}


def describe_os_error(e: OSError) -> str:
    where = f"{e.filename}" if getattr(e, "filename", None) else "a file"
    if getattr(e, "filename2", None):
        where += f" → {e.filename2}"
    what = e.strerror or str(e) or type(e).__name__
    advice = _OS_ADVICE.get(e.errno or -1, "Check the path and retry.")
    return f"{what} while working on {where}. Nothing was written.\n{advice}"


def _quiet_broken_pipe() -> None:
    """Leave quietly when stdout's reader has gone (``| head``): point stdout at /dev/null so the
    interpreter's final flush does not complain, and exit with the usual code for SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(141)


def _safe(text: str) -> str:
    """Names come from files: escape control characters (terminal escapes) before printing them."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


class _Failure(click.ClickException):
    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {_safe(self.message)}", err=True)


@click.group(cls=LoraToolsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratools")
@click.option("--debug", is_flag=True, envvar="LORATOOLS_DEBUG", help="Show tracebacks instead of short messages.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Read, convert, merge and check LoRA adapters — exactly, in bounded memory.

    \b
    Start with:
      loratools info ADAPTER                 what an adapter holds
      loratools merge BASE ADAPTER OUT       W' = W + ΔW, streamed and verified
    """
    ctx.meta["loratools.debug"] = debug


def _warn(lines: list[str]) -> None:
    for line in lines:
        click.echo(f"warning: {_safe(line)}", err=True)


def _progress(quiet: bool, label: str) -> tuple[Callable[[int, int, str], None] | None, Callable[[], None]]:
    """A progress callback drawing a bar on a terminal; silent in pipes and with --quiet."""
    if quiet or not sys.stderr.isatty():
        return None, lambda: None
    state: dict[str, Any] = {}

    def update(done: int, total: int, name: str) -> None:
        # a phase ("verify: <tensor>") starts a bar of its own; a new total or a step back does too
        phase = name.split(":", 1)[0] if ":" in name and " " not in name.split(":", 1)[0] else label
        if "bar" in state and (state["phase"] != phase or state["total"] != total or done < state["seen"]):
            state.pop("bar").__exit__(None, None, None)
        if "bar" not in state:
            state["bar"] = click.progressbar(length=total, label=phase, file=sys.stderr, show_eta=True)
            state["bar"].__enter__()
            state.update(seen=0, phase=phase, total=total)
        state["bar"].update(done - state["seen"])
        state["seen"] = done

    def close() -> None:
        if "bar" in state:
            state.pop("bar").__exit__(None, None, None)

    return update, close


layout_option = click.option(
    "--layout",
    type=click.Choice(sorted(LAYOUTS)),
    default=None,
    help="Orientation of raw factor pairs when shapes cannot tell (square modules): "
    + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()),
)


push_to_option = click.option(
    "--push-to", "push_to", default=None, metavar="REPO",
    help="Upload OUT to this Hub repo when it is written (one commit, with a model card).")


def _push_after(out: Path, repo: str | None, *, quiet: bool = False) -> None:
    if repo is None:
        return
    from .hub import push as do_push

    result = do_push(out, repo)
    _warn(result.notes)
    if not quiet:
        click.echo(f"pushed {len(result.uploaded)} file(s) to {repo}: {result.commit_url}"
                   + (f"; deleted {len(result.deleted)} stale file(s)" if result.deleted else ""))


from_option = click.option("--from", "from_format", type=click.Choice(READABLE), default=None,
                           help="The adapters' format, when detection by content should be overridden.")
allow_skip_option = click.option(
    "--allow-skip", is_flag=True,
    help="Apply what can be applied when an adapter holds keys loratools cannot (LoHa, LoKr, lora_mid…); "
    "the output says what was skipped. Without it such adapters are refused.")


def checkpoint_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options merge, unmerge and swap share."""
    for option in reversed([
        layout_option,
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda or cuda:N (auto picks CUDA when present)."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                     help="Output dtype for floating tensors (default: each tensor keeps its dtype)."),
        click.option("--precision", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True,
                     help="Arithmetic precision; the result is rounded once to the output dtype."),
        click.option("--verify/--no-verify", default=True, show_default=True,
                     help="Check the output before moving it into place: every byte read back against what was "
                          "computed, and 32 seeded random rows of each changed tensor re-computed in float64 "
                          "from the adapters' own factors."),
        click.option("--verify-full", is_flag=True,
                     help="Re-compute every changed element in float64 instead of a sample of rows (slower)."),
        click.option("--max-shard-size", default=None,
                     help="Re-shard the output (e.g. 5GB, 500MB); default: the input's sharding."),
        click.option("--dry-run", is_flag=True, help="Print what would change; write nothing."),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary."),
        from_option,
        allow_skip_option,
    ]):
        f = option(f)
    return f


def _run_checkpoint_op(verb: str, fn: Callable[..., Any], *args: Any, out: Path, as_json: bool, quiet: bool,
                       dry_run: bool, **kwargs: Any) -> None:
    """Call merge / unmerge / swap with a progress bar and render the result."""
    from .ops.merge import describe_plan

    if kwargs.pop("verify_full", False):
        if not kwargs.get("verify", True):
            raise click.UsageError("--verify-full and --no-verify contradict each other.")
        kwargs["verify"] = "full"
    bar, close = _progress(quiet or dry_run or as_json, verb)
    try:
        result = fn(*args, out, dry_run=dry_run, progress=bar, **kwargs)
    finally:
        close()
    _warn(result.warnings)
    plans = result.plans or {"": result.plan}
    if as_json:
        click.echo(json.dumps(_result_json(result), indent=2))
        return
    if dry_run:
        if result.plan is None and not result.plans:  # a GGUF model: no safetensors plan
            click.echo(f"{len(result.changed)} tensor(s) change: " + ", ".join(result.changed[:8])
                       + (" …" if len(result.changed) > 8 else ""))
            click.echo("dry run: nothing was written.")
            return
        for component, plan in plans.items():
            for line in describe_plan(plan):
                click.echo(f"{component}: {line}" if component else line)
        click.echo("dry run: nothing was written.")
        return
    if not quiet:
        gb = result.bytes_written / 1e9
        n_adapters = result.adapter_count if result.adapter_count is not None else len(
            {a.sha256 for p in plans.values() if p is not None for a in p.adapters})
        click.echo(
            f"{verb}: {n_adapters} adapter(s), {len(result.changed)} tensor(s) changed; "
            f"{result.copied} copied unchanged; wrote {gb:.2f} GB to {out} in {result.seconds:.1f} s."
        )
        if result.undo_bytes:
            where = f".{out.name}.loratools/" if out.suffix == ".safetensors" else f"{out}/.loratools/"
            click.echo(f"undo data kept in {where} (no loader reads it, push leaves it out): "
                       f"{result.undo_bytes / 1e6:.2f} MB ({100 * result.undo_bytes / max(1, result.bytes_written):.2f}% "
                       "of the weights), for " + "; ".join(result.undo_reasons) + ".")
        for note in result.notes:
            click.echo(note)
        if result.verify is not None:
            click.echo(result.verify.summary())


def _split_out(paths: tuple[Path, ...], command: str) -> tuple[list[Path], Path]:
    if len(paths) < 2:
        raise click.UsageError(f"{command} needs at least one ADAPTER and OUT.")
    return list(paths[:-1]), paths[-1]


weight_option = click.option("--weight", "weights", type=float, multiple=True,
                             help="Weight of each adapter, given once per adapter in order.")


@cli.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER... OUT", type=click.Path(path_type=Path))
@weight_option
@click.option("--reversible", is_flag=True,
              help="Store beside OUT the few values rounding would not give back, so unmerge restores BASE bit for bit.")
@push_to_option
@checkpoint_options
def merge(base: Path, paths: tuple[Path, ...], weights: tuple[float, ...], push_to: str | None,
          **options: Any) -> None:
    """Merge adapters into a base model: W' = W + Σ weightᵢ·ΔWᵢ.

    \b
    BASE      a model folder (model.safetensors, or shards + index) or one .safetensors file
    ADAPTER…  one or more adapters (PEFT folders, raw factor files)
    OUT       a new folder (or a .safetensors file when BASE is one file)

    ΔW and the sum are computed in float32 (fp64 with --precision fp64) and rounded once to
    the output dtype; tensors no adapter touches are copied byte for byte. OUT is written
    next to its final place and moved there only when complete and verified. Weights default
    to 1.

    \b
    Example:
      loratools merge ./llama ./my-lora ./llama-merged
      loratools merge ./llama ./a ./b ./out --weight 1 --weight 0.5
    """
    from .ops.merge import merge as do_merge

    adapters, out = _split_out(paths, "merge")
    _run_checkpoint_op("merge", do_merge, base, adapters, out=out, weights=list(weights), **options)
    if not options.get("dry_run"):
        _push_after(out, push_to, quiet=options.get("quiet", False))


@cli.command()
@click.argument("merged", type=click.Path(path_type=Path))
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER... OUT", type=click.Path(path_type=Path))
@weight_option
@click.option("--force", is_flag=True, help="Take out adapters that MERGED's record does not list, or at other weights.")
@click.option("--exact/--no-exact", default=True, show_default=True,
              help="Restore bit for bit when MERGED was merged with --reversible and every adapter is taken out.")
@checkpoint_options
def unmerge(merged: Path, paths: tuple[Path, ...], weights: tuple[float, ...], **options: Any) -> None:
    """Take adapters out of a merged model: W = W' − Σ weightᵢ·ΔWᵢ, one rounding.

    The adapters must be ones loratools merged into MERGED (checked by sha256 against the record in
    its files; --force overrides); weights default to the recorded ones. A model merged with
    --reversible comes back bit for bit; DoRA merges are undone with the row norms stored beside
    them.
    """
    from .ops.merge import unmerge as do_unmerge

    adapters, out = _split_out(paths, "unmerge")
    _run_checkpoint_op("unmerge", do_unmerge, merged, adapters, out=out, weights=list(weights), **options)


@cli.command()
@click.argument("merged", type=click.Path(path_type=Path))
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--old-weight", type=float, default=None, help="Weight OLD was merged with (default: the recorded one).")
@click.option("--weight", type=float, default=1.0, show_default=True, help="Weight of NEW.")
@click.option("--force", is_flag=True, help="Take OLD out even if MERGED's record does not list it.")
@checkpoint_options
def swap(merged: Path, old: Path, new: Path, out: Path, **options: Any) -> None:
    """Task switch in one pass: W'' = W' − ΔW_old + ΔW_new, rounded once."""
    from .ops.merge import swap as do_swap

    _run_checkpoint_op("swap", do_swap, merged, old, new, out=out, **options)


def _result_json(result: Any) -> dict[str, Any]:
    # the safetensors plans (a GGUF merge has none: its result lists what changed itself)
    plans = {c: p for c, p in (result.plans or {"": result.plan}).items() if p is not None}

    def named(component: str, name: str) -> str:
        return f"{component}/{name}" if component else name

    out: dict[str, Any] = {
        "out": str(result.out) if result.out else None,
        "changed": [named(c, t.name) for c, p in plans.items() for t in p.changed()] if plans else result.changed,
        "unchanged": sum(len(p.tensors()) - len(p.changed()) for p in plans.values()) if plans else result.copied,
        "files": [named(c, s.filename) for c, p in plans.items() for s in p.shards],
        "bytes": sum(p.total_bytes() for p in plans.values()) if plans else result.bytes_written,
        "adapters": list({a.sha256: {"path": a.label, "weight": a.weight, "sha256": a.sha256}
                          for p in plans.values() for a in p.adapters}.values()),
        "warnings": result.warnings,
        "seconds": result.seconds,
        "undo": {"bytes": result.undo_bytes, "reasons": result.undo_reasons} if result.undo_bytes else None,
        "requantized": {name: {"requant_rel": st.requant_rel, "original_rel": st.original_rel, "delta_rel": st.delta_rel,
                               "worst_steps": st.worst_steps}
                        for p in plans.values() for name, st in p.quant.stats.items()} or None,
        "notes": result.notes,
    }
    if result.verify is not None:
        report = result.verify
        out["verify"] = {
            "ok": report.ok,
            "level": report.level,
            "bytes_read_back": report.bytes_checked,
            "rows_per_tensor": report.sample_rows if report.level == "sample" else None,
            "seed": report.seed if report.level == "sample" else None,
            "miss_probability_10pct_rows_wrong": report.miss_probability() if report.level == "sample" else None,
            "tensors": [
                {"name": c.name, "dtype": c.dtype, "kind": c.kind, "status": c.status, "max_ulps": c.max_ulps,
                 "rel_err": c.rel_err, "bound_ratio": c.bound_ratio, "rows_checked": c.sampled or None}
                for c in result.verify.checks
                if c.kind != "identical"
            ],
        }
    return out


def _report_modules(result: Any, as_json: bool, verb: str, quiet: bool = False) -> None:
    _warn(result.warnings)
    if as_json:
        click.echo(json.dumps({
            "out": str(result.out) if result.out else None,
            "modules": [{"target": m.target, "rank": m.rank, "relative_error": m.relative_error, "note": m.note}
                        for m in result.modules],
            "replacements": result.replacements,
            "skipped": result.skipped,
            "warnings": result.warnings,
        }, indent=2))
        return
    if result.modules and not quiet:
        width = max(len(m.target) for m in result.modules)
        click.echo(f"{'module':<{width}}  rank  rel. error")
        for m in result.modules:
            click.echo(f"{m.target:<{width}}  {m.rank:>4}  {m.relative_error:.3e}  {m.note}".rstrip())
    if result.replacements and not quiet:
        click.echo(f"full tensors kept: {', '.join(result.replacements)}")
    if result.skipped and not quiet:
        click.echo(f"skipped: {', '.join(result.skipped)}")
    where = f" to {result.out}" if result.out else " (dry run: nothing was written)"
    click.echo(f"{verb}: {len(result.modules)} module(s){where}.")


to_option = click.option("--to", "to", type=click.Choice(WRITABLE), default="peft",
                         show_default=True, help="Format of the written adapter.")


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER... OUT", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["cat", "svd", "linear", "ties", "dare_linear", "dare_ties",
                                             "magnitude_prune"]), required=True,
              help="cat: exact, ranks add up. svd/linear: best rank-R approximation of Σ wᵢΔWᵢ. ties, dare_linear, "
              "dare_ties, magnitude_prune: on ΔW, then factorized to rank R.")
@weight_option
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Target rank (default: the sum of the input ranks).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Keep the smallest rank holding this fraction of ‖ΔW‖² (capped by --rank).")
@click.option("--density", type=float, default=None, help="Fraction of ΔW entries kept (ties, dare_*, magnitude_prune).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random pruning.")
@to_option
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Read the written adapter back and check each module's ΔW in float64 (cat: against Σ wᵢΔWᵢ).")
@click.option("--dry-run", is_flag=True, help="Compute and report; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Bind every adapter to this base first, so that kohya, diffusers and PEFT names of one module meet.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Store the written factors in this dtype (default: the inputs' own; extract: fp32).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no table: the summary line only.")
@push_to_option
def stack(paths: tuple[Path, ...], method: str, weights: tuple[float, ...], rank: int | None, energy: float | None,
          density: float | None, seed: int, to: str, verify: bool, dry_run: bool, overwrite: bool,
          as_json: bool, base: Path | None, dtype: str | None, quiet: bool, push_to: str | None) -> None:
    """One adapter from several: ADAPTER... OUT.

    Everything is combined as ΔW — never A and B separately, which would add cross terms. svd
    never forms the full matrices (QR of the stacked factors, SVD of the small core) and reaches
    the Eckart–Young optimum; the report gives each module's relative error.
    """
    from .ops.stack import stack as do_stack

    adapters, out = _split_out(paths, "stack")
    bar, close = _progress(quiet or as_json, "stacking")
    try:
        result = do_stack(adapters, out, method=method, weights=list(weights), rank=rank, energy=energy,
                          density=density, seed=seed, to=to, overwrite=overwrite, dry_run=dry_run, verify=verify,
                          base=base, dtype=dtype, progress=bar)
    finally:
        close()
    _report_modules(result, as_json, f"stack --method {method}", quiet)
    if not dry_run:
        _push_after(out, push_to, quiet=as_json or quiet)


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Keep at most this rank per module.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Keep the smallest rank holding this fraction of ‖ΔW‖² (capped by --rank).")
@to_option
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Store the written factors in this dtype (default: the inputs' own; extract: fp32).")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="The model the adapter was made for: kohya/LyCORIS names need it to be written elsewhere.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no table: the summary line only.")
def resize(adapter: Path, out: Path, rank: int | None, energy: float | None, to: str, overwrite: bool,
           as_json: bool, dtype: str | None, base: Path | None, quiet: bool) -> None:
    """Change an adapter's rank by truncated SVD of each module's ΔW (best rank-R, Eckart–Young).

    Any kind of module becomes a plain LoRA of that rank: LoHa, LoKr and full diffs too."""
    from .ops.stack import resize as do_resize

    bar, close = _progress(quiet or as_json, "resizing")
    try:
        result = do_resize(adapter, out, rank=rank, energy=energy, to=to, overwrite=overwrite, dtype=dtype, base=base,
                           progress=bar)
    finally:
        close()
    _report_modules(result, as_json, "resize", quiet)


@cli.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("tuned", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Rank of every extracted module.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Per module, the smallest rank holding this fraction of ‖ΔW‖² (capped by --rank).")
@click.option("--embeddings", type=click.Choice(["full", "lora", "skip"]), default="full", show_default=True,
              help="Changed embeddings: keep as full tensors, factorize, or leave out.")
@click.option("--norms", type=click.Choice(["full", "skip"]), default="full", show_default=True,
              help="Changed 1-D tensors (norms, biases): keep as full tensors or leave out.")
@to_option
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no table: the summary line only.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Store the written factors in this dtype (default: the inputs' own; extract: fp32).")
def extract(base: Path, tuned: Path, out: Path, rank: int | None, energy: float | None, embeddings: str, norms: str,
            to: str, overwrite: bool, as_json: bool, quiet: bool, dtype: str | None) -> None:
    """A LoRA adapter from a fine-tuned model: SVD of TUNED − BASE per weight (float32), streamed."""
    from .ops.stack import extract as do_extract

    bar, close = _progress(quiet or as_json, "extracting")
    try:
        result = do_extract(base, tuned, out, rank=rank, energy=energy, embeddings=embeddings, norms=norms, to=to,
                            overwrite=overwrite, progress=bar, dtype=dtype)
    finally:
        close()
    _report_modules(result, as_json, "extract", quiet)


@cli.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER... MERGED", type=click.Path(path_type=Path))
@weight_option
@layout_option
@click.option("--forward", is_flag=True,
              help="Also run random inputs through every targeted layer, un-merged (x→A→B) and merged.")
@click.option("--round-trip", "round_trip", is_flag=True,
              help="BASE ADAPTER...: merge, unmerge and report how far BASE comes back (no MERGED argument).")
@click.option("--all", "show_all", is_flag=True, help="List bit-identical tensors too.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; only the summary line.")
def verify(base: Path, paths: tuple[Path, ...], weights: tuple[float, ...], layout: str | None, forward: bool,
           round_trip: bool, show_all: bool, as_json: bool, quiet: bool) -> None:
    """Check that MERGED == round(BASE + Σ weightᵢ·ΔWᵢ): BASE ADAPTER... MERGED.

    Changed tensors must lie within one ulp of the output dtype (plus the float32 error bound) of
    the float64 reference, every other tensor must be bit-identical, and no tensor may be missing
    or extra. Exits 0 when all hold, 1 when any does not, naming the failing tensors. Works on
    merges made by any tool.
    """
    from .ops.check import round_trip as do_round_trip, verify_checkpoint

    if round_trip:
        bar, close = _progress(quiet or as_json, "round trip")
        try:
            rt = do_round_trip(base, list(paths), weights=list(weights) or None, layout=layout, progress=bar)
        finally:
            close()
        data = {
            "tensors": rt.tensors, "elements": rt.elements, "bit_exact_fraction": rt.bit_exact / max(1, rt.elements),
            "max_ulps": rt.max_ulps, "reversible_overhead_bytes": rt.reversible_overhead,
            "reversible_bit_exact": rt.reversible_exact, "weights_bytes": rt.weights_bytes,
        }
        if as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            click.echo(f"merge → unmerge of {rt.tensors} changed tensor(s), {rt.elements:,} elements: "
                       f"{100 * data['bit_exact_fraction']:.3f}% bit-exact, worst {rt.max_ulps:.2f} ulp.")
            click.echo(f"with --reversible: {'bit-exact' if rt.reversible_exact else 'NOT bit-exact'}, undo data "
                       f"{rt.reversible_overhead / 1e6:.3f} MB ({100 * rt.reversible_overhead / max(1, rt.weights_bytes):.2f}% "
                       "of the weights).")
        if not rt.reversible_exact:
            raise _Failure("the reversible round trip did not restore BASE bit for bit.")
        return
    if len(paths) < 2:
        raise click.UsageError("verify needs BASE, at least one ADAPTER, and MERGED (or --round-trip).")
    *adapters, merged = paths
    bar, close = _progress(quiet or as_json, "verifying")
    try:
        report = verify_checkpoint(base, adapters, merged, weights=list(weights) or None, layout=layout,
                                   forward=forward, progress=bar)
    finally:
        close()
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "tensors": [
            {"name": c.name, "dtype": c.dtype, "kind": c.kind, "status": c.status, "max_ulps": c.max_ulps,
             "rel_err": c.rel_err, "mismatched": c.mismatched} for c in report.checks]}, indent=2))
    else:
        rows = [c for c in report.checks if show_all or c.kind != "identical" or not c.ok]
        if rows and not quiet:
            width = max(len(c.name) for c in rows)
            click.echo(f"{'tensor':<{width}}  {'dtype':<5} {'check':<9} {'max ulp':>9} {'rel err':>10}  status")
            for c in rows:
                ulps = "-" if c.kind in ("identical", "restored", "missing", "extra", "shape", "dtype") else (
                    f"{c.max_ulps:9.2f}")
                rel = "-" if ulps == "-" else f"{c.rel_err:10.2e}"
                click.echo(f"{c.name:<{width}}  {c.dtype:<5} {c.kind:<9} {ulps:>9} {rel:>10}  {c.status}")
            if any(c.kind == "forward" for c in rows):
                click.echo("(forward rows: max ulp column = largest error / its bound)")
        click.echo(report.summary())
    if not report.ok:
        raise _Failure(f"{merged} does not verify: {len(report.failures)} tensor(s) fail: "
                       + ", ".join(f"{c.name} ({c.kind})" for c in report.failures[:10]))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--base-model", default=None, help="The card's base_model (a Hub repo id; default: from the files' "
              "provenance or adapter_config.json).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--include-undo", is_flag=True,
              help="Also upload loratools' undo data (.loratools/), which unmerge needs; left out by default.")
@click.option("--revision", default=None, help="Branch to commit to.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--message", "-m", default=None, help="Commit message.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but warnings and errors.")
def push(path: Path, repo_id: str, base_model: str | None, private: bool, revision: str | None, create_pr: bool,
         message: str | None, as_json: bool, quiet: bool, include_undo: bool) -> None:
    """Upload a folder (a merged model or an adapter) to the Hub as one commit.

    The repo is created if needed; remote weight shards and indexes the folder no longer has are
    deleted in the same commit; a model card is written or completed (base_model,
    base_model_relation, library_name, tags, how the files were made). Token from HF_TOKEN or
    the standard login, endpoint from HF_ENDPOINT.
    """
    from .hub import push as do_push

    result = do_push(path, repo_id, base_model=base_model, private=private, revision=revision, create_pr=create_pr,
                     message=message, include_undo=include_undo)
    _warn(result.notes)
    where = result.pr_url or result.commit_url
    if as_json:
        click.echo(json.dumps({"repo_id": repo_id, "commit_url": result.commit_url, "pr_url": result.pr_url,
                               "uploaded": result.uploaded, "deleted": result.deleted, "notes": result.notes}, indent=2))
    elif not quiet:
        click.echo(f"pushed {len(result.uploaded)} file(s) to {repo_id}: {where}"
                   + (f"; deleted {len(result.deleted)} stale file(s)" if result.deleted else ""))


scale_option = click.option(
    "--scale", type=float, default=None,
    help="Raw factor files only: the multiplier their code applied to the product (default 1).",
)


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(WRITABLE), required=True,
              help="Format to write (gguf needs --base and the gguf package).")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Base checkpoint to bind to (needed for raw factors whose orientation shapes cannot tell).")
@layout_option
@scale_option
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None, help="Store the factors in this dtype.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Read the written adapter back and compare every module's ΔW with the input's (float64).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--for", "server", type=click.Choice(["vllm", "tgi"]), default=None,
              help="With --to peft: shape the adapter for this server (one r and alpha, scales folded into B, zero "
              "padding; no full tensors, DoRA or lora_bias) and say what changed.")
@click.option("--max-rank", type=click.IntRange(min=1), default=None, help="With --for: the server's max_lora_rank.")
@click.option("--to-lora", is_flag=True,
              help="Turn every module that is not a plain LoRA (LoHa, LoKr, full diffs) into the best plain LoRA "
              "of rank --rank (Eckart–Young, per module), reporting each one's relative error. The only lossy "
              "conversion, and only when asked.")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="With --to-lora: the rank to keep.")
@click.option("--energy", type=float, default=None,
              help="With --to-lora: keep the smallest rank holding this fraction of ‖ΔW‖² (capped by --rank).")
@from_option
@allow_skip_option
@push_to_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but warnings and errors.")
def convert(adapter: Path, out: Path, to: str, base: Path | None, layout: str | None, scale: float | None,
            dtype: str | None, verify: bool, overwrite: bool, server: str | None, max_rank: int | None,
            to_lora: bool, rank: int | None, energy: float | None,
            from_format: str | None, allow_skip: bool, push_to: str | None, as_json: bool, quiet: bool) -> None:
    """Rewrite an adapter in another format, keeping every module's ΔW.

    \b
    A raw state dict (a module's weights saved beside its LoRA factors) becomes an adapter of its
    factors, bound to the weights in the same file:
      loratools convert model_with_lora.safetensors ./peft-adapter --to peft --scale 2
    \b
    A LyCORIS file (LoHa, LoKr…) for a format that holds only LoRA, at rank 32:
      loratools convert lokr.safetensors ./lora --to peft --to-lora --rank 32 --base BASE
    """
    from .ops.convert import convert as do_convert

    bar, close = _progress(quiet or as_json, "converting")
    try:
        result = do_convert(adapter, out, to=to, base=base, layout=layout, dtype=dtype, scale=scale,
                            overwrite=overwrite, verify=verify, server=server, max_rank=max_rank,
                            to_lora=to_lora, rank=rank, energy=energy,
                            from_format=from_format, allow_skip=allow_skip, progress=bar)
    finally:
        close()
    _warn(result.warnings)
    approx = [{"target": r.target, "rank": r.rank, "relative_error": r.relative_error, "from": r.note}
              for r in result.approximated]
    if as_json:
        click.echo(json.dumps({"out": str(out), "format": result.format, "modules": result.modules,
                               "max_rel_err": result.max_rel_err if verify else None, "warnings": result.warnings,
                               "to_lora": approx}, indent=2))
    elif not quiet:
        for r in result.approximated:
            click.echo(f"  {r.target}: {r.note} → LoRA r={r.rank}, relative error {r.relative_error:.2e}")
        check = f"; ΔW verified (max relative difference {result.max_rel_err:.1e})" if verify else ""
        click.echo(f"wrote {result.modules} module(s) as {result.format} to {out}{check}.")
    _push_after(out, push_to, quiet=quiet or as_json)


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Bind to this base: show which tensor each module changes, and what does not bind.")
@layout_option
@scale_option
@from_option
@allow_skip_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="The summary line only, no table.")
def info(adapter: Path, base: Path | None, layout: str | None, scale: float | None, from_format: str | None,
         allow_skip: bool, as_json: bool, quiet: bool) -> None:
    """What an adapter is: format, targets, ranks, alphas and scales, dtypes, parameter count,
    and ‖ΔW‖ per module."""
    from .hub import resolve
    from .summary import summarize_fast

    data = None
    if base is None and layout is None and scale is None and from_format in (None, "peft"):
        local = Path(resolve(adapter, kind="adapter"))
        if not local.exists():
            raise AdapterNotFoundError(f"Adapter not found: {adapter}.", path=adapter)
        data = summarize_fast(local, shown_as=str(adapter))  # no torch
    self_bound = False
    if data is None:
        from .options import Options
        from .pipeline import inspect_adapter
        from .summary import summarize_adapter

        opts = Options.build(layout=layout, from_format=from_format, allow_skip=allow_skip)
        try:
            seen = inspect_adapter(adapter, opts, base=base, scale=scale)
        except (NotAnAdapterError, AdapterNotFoundError) as e:  # not an adapter at all: a model, perhaps
            if from_format is not None:
                raise
            from .summary import describe_model

            local = Path(resolve(adapter))
            model = describe_model(local, shown_as=str(adapter)) if local.exists() else None
            if model is None:
                raise e from None
            _show_model(model, as_json)
            return
        data = summarize_adapter(seen.adapter, shown_as=str(adapter), base=str(base) if base else None,
                                 unbound=seen.unbound)
        self_bound = bool(seen.adapter.meta.get("base_keys"))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = data["module_list"]
    _warn(data["warnings"])
    present = {r.get("delta", "lowrank") for r in rows}
    what = "LoRA module(s)" if present <= {"lowrank"} else \
        "module(s) (" + ", ".join(sorted("LoRA" if k == "lowrank" else k for k in present)) + ")"
    click.echo(f"{adapter}: {data['format']} adapter, {len(rows)} {what}, {data['parameters']:,} parameters")
    if quiet:
        return
    if data["base_model"]:
        click.echo(f"base model: {data['base_model']}")
    if data["replacements"]:
        click.echo(f"full tensors (replace the base): {', '.join(data['replacements'])}")
    if rows:
        _module_table(rows)
    if data["unbound"]:
        click.echo(f"{len(data['unbound'])} module(s) do NOT bind to {base}:")
        for name, why in sorted(data["unbound"].items()):
            click.echo(f"  {name}: {why}")
    elif base or self_bound:
        click.echo(f"all {len(rows)} module(s) bind to tensors of {base or adapter} with matching shapes.")
    if any(r["kind"].endswith("(orientation open)") for r in rows):
        click.echo("orientation of raw factors is settled by --base or --layout; ‖ΔW‖ does not depend on it.")


def _show_model(model: dict[str, Any], as_json: bool) -> None:
    """``info`` of a model: what loratools merged into it, from its record."""
    if as_json:
        click.echo(json.dumps(model, indent=2))
        return
    click.echo(f"{model['path']}: a model, not an adapter — {model['tensors']} tensors, "
               f"{model['parameters']:,} parameters in {len(model['files'])} file(s).")
    record = model["merged"]
    if not record:
        click.echo("It carries no loratools record: it was not written by loratools.")
        return
    adapters = record.get("adapters") or []
    click.echo(f"Written by {record.get('tool', 'loratools')} ({record.get('operation', '?')}); "
               f"{len(adapters)} adapter(s) merged into it now:")
    for a in adapters:
        click.echo(f"  {a.get('path')}  weight {a.get('weight')}  sha256 {str(a.get('sha256'))[:16]}…")
    if record.get("base_model"):
        click.echo(f"base model: {record['base_model']}")


def _module_table(rows: list[dict[str, Any]]) -> None:
    width = max(len(r["target"]) for r in rows)
    click.echo(f"{'target':<{width}}  {'kind':<22} {'rank':>4} {'alpha':>8} {'scale':>9}  dtype  {'‖ΔW‖':>10}")
    for r in rows:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        extra = ((f" {r['delta']}" if r.get("delta", "lowrank") != "lowrank" else "") + (" DoRA" if r["dora"] else "")
                 + (" +bias" if r["lora_bias"] else ""))
        click.echo(
            f"{r['target']:<{width}}  {r['kind'] + extra:<22} {r['rank'] if r['rank'] is not None else '-':>4} "
            f"{alpha:>8} {r['scale']:>9.4g}  "
            f"{r['dtype']:<5}  {'-' if r['delta_norm'] is None else format(r['delta_norm'], '.4g'):>10}"
        )


def main() -> None:
    cli(prog_name="loratools")


if __name__ == "__main__":  # pragma: no cover
    main()
