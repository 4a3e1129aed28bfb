"""The hwtool command line: parses options, calls one plain function, prints. Nothing else."""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console

console = Console(stderr=True)
out = Console()

# ONNX Runtime threads: far more than the machine has cores only slows it (tens of thousands hang it).
THREADS = click.IntRange(1, max(256, 4 * (os.cpu_count() or 1)))

# Errors that bad input raises; they become one line and exit status 2, as do other OSErrors (a
# path the system refuses) and ONNX Runtime failing to run a model (see friendly). Everything else
# is a bug and keeps its traceback.
# FloatingPointError: training diverged (the message says to lower --lr).
_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    FloatingPointError,
)


def _first_line(e: BaseException) -> str:
    # runtime.first_line, kept here: importing runtime (onnx, onnxruntime) would slow every start
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _os_message(e: OSError) -> str:
    """An operating-system error on a path (name too long, not a folder, disk full, ...) as one line."""
    if e.errno is None or not e.strerror:  # raised by hwtool itself, with its own message
        return _first_line(e)
    where = f" {e.filename}" if e.filename is not None else ""
    return f"cannot use{where}: {e.strerror[0].lower()}{e.strerror[1:]}; check the path"


def _runtime_message(e: Exception) -> str:
    """ONNX Runtime failing to run a model that loaded (a size fixed inside it, say) as one line."""
    msg = _first_line(e)
    if msg.startswith("[ONNXRuntimeError] : "):  # "[ONNXRuntimeError] : 1 : FAIL : what happened"
        msg = msg.split(" : ", 3)[-1]
    # ORT's failed checks name its source file and function before saying what went wrong
    msg = re.sub(r"/onnxruntime_src/\S+:\d+ .*? was false\. ", "", msg)
    hint = ""
    if "shape" in msg.lower() or "dimension" in msg.lower():
        hint = "; a size fixed inside the model (a Reshape to a constant shape?) needs a re-export with dynamic sizes"
    return f"ONNX Runtime could not run the model: {msg}{hint}"


def friendly(fn):
    """Turn user errors into a one-line message and a non-zero exit, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as e:
            click.echo(f"error: {_first_line(e)}", err=True)
            sys.exit(2)
        except OSError as e:
            click.echo(f"error: {_os_message(e)}", err=True)
            sys.exit(2)
        except MemoryError as e:  # numpy names the array it could not allocate
            what = f" ({_first_line(e)})" if str(e).strip() else ""
            click.echo(f"error: out of memory{what}; use a smaller --batch or fewer samples", err=True)
            sys.exit(2)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in ("torch", "onnxscript"):
                click.echo(
                    f"error: this command needs {e.name.split('.')[0]}; install it with `pip install 'hwtool[train]'`",
                    err=True,
                )
                sys.exit(2)
            raise
        except Exception as e:
            # ONNX Runtime's own errors (checked by name: this module does not import it)
            if not type(e).__module__.startswith("onnxruntime."):
                raise
            click.echo(f"error: {_runtime_message(e)}", err=True)
            sys.exit(2)

    return wrapper


class _Number(click.FloatRange):
    """click.FloatRange that also refuses NaN and infinity (which pass its range checks)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.min is None and self.max is None:
            self.name = "float"  # the help's metavar: FLOAT, not FLOAT RANGE

    def _describe_range(self) -> str:
        # Unbounded, click would show "x<=None" in the help: show no range at all.
        return "" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


def _items(text: str, what: str, option: str) -> list[str]:
    """The items of a comma-separated list; an empty item is a mistake."""
    items = [v.strip() for v in text.split(",")]
    if any(not v for v in items):
        raise click.BadParameter(f"{text!r} has an empty item; separate {what} with single commas", param_hint=option)
    return items


def _ints(text: str | None, option: str, unique: bool = False) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in _items(text, "integers", option))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=option) from None
    if min(values) <= 0:
        raise click.BadParameter(f"{text!r} must list positive integers", param_hint=option)
    if unique and len(set(values)) < len(values):
        raise click.BadParameter(f"{text!r} lists a value twice", param_hint=option)
    return values


def _sizes(text: str | None, option: str) -> tuple[tuple[str, int], ...]:
    """NAME=SIZE,... as (name, positive size) pairs, each name once."""
    if text is None:
        return ()
    pairs = []
    for item in _items(text, "NAME=SIZE pairs", option):
        name, eq, size = item.partition("=")
        if not eq or not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise click.BadParameter(f"{item!r} is not NAME=SIZE with a positive integer SIZE", param_hint=option)
        pairs.append((name.strip(), int(size)))
    if len({n for n, _ in pairs}) < len(pairs):
        raise click.BadParameter(f"{text!r} names a dimension twice", param_hint=option)
    return tuple(pairs)


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in _items(text, "numbers", option))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None
    if not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"{text!r} must list finite numbers", param_hint=option)
    if len(set(values)) < len(values):
        raise click.BadParameter(f"{text!r} lists a value twice", param_hint=option)
    return values


class _UsageError(click.ClickException):
    """A usage error (bad or missing option value) shown as the CLI's other errors are: one line."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


# click >= 8.2 shows the help for a bare `hwtool` by raising this usage error; older click has none.
_HELP_FOR_NO_ARGS: tuple[type[BaseException], ...] = tuple(
    e for e in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if e is not None
)


class _Group(click.Group):
    """click.Group whose usage errors, its own and its commands', are one `error:` line, exit 2
    (click's own form is three lines: usage, hint, error). A bare `hwtool` still prints its help."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None


def _one_line(e: click.UsageError) -> click.ClickException:
    """The usage error as one line naming the help to read, or unchanged where it is the help."""
    if isinstance(e, _HELP_FOR_NO_ARGS):
        return e
    where = f" (see `{e.ctx.command_path} -h`)" if e.ctx is not None else ""
    return _UsageError(e.format_message().rstrip(".") + where)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hwtool")
def main() -> None:
    """hwtool: train, prune, quantize and benchmark highway networks as ONNX models."""
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, without the source line Python would print under it."""
    click.echo(f"warning: {message}", err=True)


# ---------------------------------------------------------------------------------------------
# train and export (need torch)


_cutout_option = click.option(
    "--cutout",
    type=click.IntRange(0, 32),
    default=0,
    show_default=True,
    help="Augmentation: fill a random N x N square of each training image with the mean colour (0: off).",
)


_ema_option = click.option(
    "--ema",
    type=_Number(0, 1, max_open=True),
    default=0.0,
    show_default=True,
    help="Keep a moving average of the weights (and batch-norm statistics) with this decay per step, "
    "e.g. 0.999; the checkpoint, its test accuracy and its export are the average's (0: off).",
)


def _distill_options(fn):
    fn = click.option(
        "--distill-temperature",
        type=_Number(0, min_open=True),
        default=4.0,
        show_default=True,
        help="τ: both networks' logits are divided by it before the softmax.",
    )(fn)
    fn = click.option(
        "--distill-weight",
        type=_Number(0, 1, min_open=True),
        default=0.5,
        show_default=True,
        help="α: loss = (1 − α)·label loss + α·distillation loss (with --teacher).",
    )(fn)
    fn = click.option(
        "--teacher",
        type=click.Path(),
        default=None,
        help="Distil from this trained network (checkpoint.pt or unpruned ONNX model; any width and depth).",
    )(fn)
    return fn


@main.command()
@click.option("--data", required=True, type=click.Path(), help="CIFAR-10 folder or .tar.gz.")
@click.option("--out", required=True, type=click.Path(), help="Run folder (checkpoint.pt, log.json).")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--lr", type=_Number(0, min_open=True), default=0.1, show_default=True, help="Peak LR.")
@click.option(
    "--gate-penalty",
    "gate_penalty",
    type=_Number(0),
    default=0.0,
    show_default=True,
    help="λ: weight of the mean-gate incentive.",
)
@click.option(
    "--gate-weighting",
    type=click.Choice(["params", "flops", "uniform"]),
    default="params",
    show_default=True,
    help="Weigh each block's mean gate by its channels' parameter cost (size), FLOP cost (latency), or equally.",
)
@click.option(
    "--gate-shape",
    type=click.Choice(["mean", "sqrt"]),
    default="mean",
    show_default=True,
    help="Incentive per block: the mean gate, or the mean over channels of sqrt(mean gate) (drives gates off or on).",
)
@click.option(
    "--silence-penalty",
    type=_Number(0),
    default=0.0,
    show_default=True,
    help="μ: weight of mean(H·(1−T)) with T detached; silences H where the gate is low.",
)
@click.option(
    "--targeted-dropout",
    type=_Number(0, 1),
    default=0.0,
    show_default=True,
    help="p: each step, drop each channel whose running mean gate is under --targeted-threshold with prob p.",
)
@click.option(
    "--targeted-threshold",
    type=_Number(0, 1),
    default=0.05,
    show_default=True,
    help="Running mean gate under which a channel is a dropout target (the prune threshold you plan).",
)
@click.option(
    "--targeted-keep",
    type=_Number(0, 1, min_open=True),
    default=None,
    help="Prune while training: remove channels for good, lowest running mean gate first, until this "
    "fraction of the parameters is left (reached by --targeted-keep-by of the steps).",
)
@click.option(
    "--targeted-keep-by",
    type=_Number(0, 1, min_open=True),
    default=0.6,
    show_default=True,
    help="Fraction of the steps by which --targeted-keep is reached (removal starts when λ is at full strength).",
)
@click.option(
    "--gate-ramp",
    type=_Number(0, 1),
    default=0.2,
    show_default=True,
    help="Fraction of the steps over which λ rises linearly from zero (μ applies from the start).",
)
@click.option(
    "--from",
    "init",
    type=click.Path(),
    default=None,
    help="Start from this checkpoint's (or exported model's) weights and network shape, on a new schedule.",
)
@click.option("--widths", default=None, help="Filters per stage.  [default: 64,128,256]")
@click.option("--depth", type=click.IntRange(1), default=None, help="Blocks per stage.  [default: 6]")
@click.option("--limit", type=click.IntRange(1), default=None, help="Train and test on the first N images.")
@_cutout_option
@_ema_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--fp32/--mixed",
    default=None,
    help="Float32, or mixed precision (bf16 autocast).  [default: mixed on bf16 GPUs and CPUs with native bf16]",
)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="torch.compile the model (faster after warm-up); not with --targeted-dropout or --targeted-keep, "
    "whose kept-channel steps it gets wrong.",
)
@_distill_options
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@friendly
def train(
    data,
    out,
    epochs,
    batch_size,
    lr,
    gate_penalty,
    gate_weighting,
    gate_shape,
    silence_penalty,
    targeted_dropout,
    targeted_threshold,
    targeted_keep,
    targeted_keep_by,
    gate_ramp,
    init,
    widths,
    depth,
    limit,
    cutout,
    ema,
    seed,
    fp32,
    compile_,
    teacher,
    distill_weight,
    distill_temperature,
    resume,
):
    """Train the highway network on CIFAR-10 (also under torchrun for DDP)."""
    from hwtool.train import config_from_options
    from hwtool.train import train as run

    resuming = resume and (Path(out) / "checkpoint.pt").is_file()
    # On a resume --teacher says where the run's teacher lives now (its file checked unchanged).
    teacher_at = teacher if resuming else None
    if resuming:
        _ignored_on_resume(TRAIN_SETTINGS)
        init = teacher = None  # the checkpoint's own are used (and checked): these are not read
    else:
        if teacher is None:
            _unused(("distill_weight", "distill_temperature"), "without --teacher")
        if targeted_keep is None:
            _unused(("targeted_keep_by",), "without --targeted-keep")
        if not targeted_dropout and targeted_keep is None:
            _unused(("targeted_threshold",), "without --targeted-dropout or --targeted-keep")

    cfg = config_from_options(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        gate_penalty=gate_penalty,
        gate_weighting=gate_weighting,
        gate_shape=gate_shape,
        silence_penalty=silence_penalty,
        targeted_dropout=targeted_dropout,
        targeted_threshold=targeted_threshold,
        targeted_keep=targeted_keep,
        targeted_keep_by=targeted_keep_by,
        gate_ramp=gate_ramp,
        init=init,
        widths=_ints(widths, "--widths"),
        depth=depth,
        limit=limit,
        cutout=cutout,
        ema=ema,
        seed=seed,
        bf16=None if fp32 is None else not fp32,
        compile=compile_,
        teacher=teacher,
        distill_weight=distill_weight,
        distill_temperature=distill_temperature,
    )
    _summary(run(cfg, data, out, resume=resume, console=console, teacher_at=teacher_at), out)


# train's options that set what a run trains (a resumed run takes them from its checkpoint)
TRAIN_SETTINGS = (
    "epochs", "batch_size", "lr", "gate_penalty", "gate_weighting", "gate_shape", "silence_penalty",
    "targeted_dropout", "targeted_threshold", "targeted_keep", "targeted_keep_by", "gate_ramp", "init",
    "widths", "depth", "limit", "cutout", "ema", "seed", "fp32", "teacher", "distill_weight",
    "distill_temperature",
)  # fmt: skip


def _summary(ckpt: dict, out: str) -> None:
    """One line on a finished (or, under DDP, non-zero rank: empty) run."""
    if not ckpt:
        return
    last = ckpt["log"][-1]
    kept = f" with {sum(last['kept_channels'])} transform channels kept" if "kept_channels" in last else ""
    live = f" (the weight average; the trained weights {last['test_acc_live']:.4f})" if "test_acc_live" in last else ""
    path = Path(out) / "checkpoint.pt"
    console.print(f"test accuracy {last['test_acc']:.4f}{live} after {last['epoch']} epochs{kept}; checkpoint {path}")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="CIFAR-10 folder or .tar.gz.")
@click.option("--out", required=True, type=click.Path(), help="Run folder for the fine-tuned checkpoint.")
@click.option(
    "--threshold",
    type=_Number(),
    required=True,
    help="Channels whose mean gate is under this are removed before training (as `hwtool prune` would).",
)
@click.option("--epochs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--lr", type=_Number(0, min_open=True), default=0.01, show_default=True, help="Peak LR.")
@click.option("--gate-penalty", type=_Number(0), default=0.0, show_default=True, help="λ while fine-tuning.")
@click.option(
    "--count", type=click.IntRange(1), default=512, show_default=True, help="Training images that measure the gates."
)
@click.option("--limit", type=click.IntRange(1), default=None, help="Train and test on the first N images.")
@_cutout_option
@_ema_option
@click.option(
    "--fp32/--mixed",
    default=None,
    help="Float32, or mixed precision (bf16 autocast).  [default: mixed on bf16 GPUs and CPUs with native bf16]",
)
@_distill_options
@click.option("--resume", is_flag=True, help="Continue the fine-tuning run in --out.")
@friendly
def finetune(
    checkpoint,
    data,
    out,
    threshold,
    epochs,
    lr,
    gate_penalty,
    count,
    limit,
    cutout,
    ema,
    fp32,
    teacher,
    distill_weight,
    distill_temperature,
    resume,
):
    """Fine-tune a trained checkpoint with its low-gate channels removed.

    The removed channels are baked into the weights (zero transform, gate bias -30), so exporting
    the result and pruning it at 1e-6 removes exactly them, with no refit needed (at the threshold
    itself, kept gates that drifted under it while training go too).
    With --teacher CHECKPOINT (the same file) the pruned network learns from the unpruned one; a
    teacher that finetune itself pruned runs its kept channels only.
    """
    from hwtool.train import CHECKPOINT, finetune_config
    from hwtool.train import train as run

    resuming = resume and (Path(out) / CHECKPOINT).is_file()
    if resuming:
        _ignored_on_resume(FINETUNE_SETTINGS)
    elif teacher is None:
        _unused(("distill_weight", "distill_temperature"), "without --teacher")
    cfg = finetune_config(
        checkpoint,
        threshold,
        resume_from=Path(out) / CHECKPOINT if resume else None,
        epochs=epochs,
        lr=lr,
        gate_penalty=gate_penalty,
        calib_images=count,
        limit=limit,
        cutout=cutout,
        ema=ema,
        bf16=None if fp32 is None else not fp32,
        teacher=teacher,
        distill_weight=distill_weight,
        distill_temperature=distill_temperature,
    )
    # On a resume --teacher says where the run's teacher lives now (its file checked unchanged).
    teacher_at = teacher if resuming else None
    _summary(run(cfg, data, out, resume=resume, console=console, teacher_at=teacher_at), out)


# finetune's options that set what a run trains (--threshold, required, is taken as given: not named)
FINETUNE_SETTINGS = (
    "epochs", "lr", "gate_penalty", "count", "limit", "cutout", "ema", "fp32", "teacher", "distill_weight",
    "distill_temperature",
)  # fmt: skip


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="ONNX file to write.")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True)
@click.option(
    "--opset",
    type=click.IntRange(17, 21),
    default=18,
    show_default=True,
    help="ONNX opset: 18 to 21, or 17 with --exporter torchscript (dynamo writes 18 and up).",
)
@click.option("--data", type=click.Path(), default=None, help="CIFAR-10 (default: the path in the checkpoint).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON line.")
@friendly
def export(checkpoint, output, exporter, opset, data, as_json):
    """Export CHECKPOINT to ONNX, run the checker and compare ORT with PyTorch."""
    import logging

    from hwtool.export import export_checkpoint
    from hwtool.runtime import check_outputs

    if Path(checkpoint).is_dir():
        raise ValueError(f"checkpoint {checkpoint} is a folder; pass the checkpoint.pt in it")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    check_outputs([output], [checkpoint, data])
    # The exporters' own chatter (onnxscript logs a failed opset conversion with its traceback;
    # export_checkpoint then says in one line what went wrong).
    for name in ("torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore")
    rep = export_checkpoint(checkpoint, output, exporter=exporter, opset=opset, data=data)
    if as_json:
        _echo_json(rep.__dict__)  # one line, as --help promises
    else:
        out.print(
            f"wrote {rep.path} ({rep.exporter}, opset {rep.opset}, {rep.parameters:,} parameters); "
            f"ORT vs PyTorch on {rep.images_compared} test images: max abs diff {rep.max_abs_diff:.2e}, "
            f"top-1 agreement {rep.top1_agreement:.1%}"
        )


# ---------------------------------------------------------------------------------------------
# deployment side (no torch)


TEST_SET_HELP = (
    "a test set of the model's own inputs: an .npz of one array per input name (as --calib) and "
    "'labels', one integer class id per sample."
)


@main.command("eval")
@click.argument("model", type=click.Path())
@click.option(
    "--data",
    required=True,
    type=click.Path(),
    help="CIFAR-10 (a folder or .tar.gz: its test split), or " + TEST_SET_HELP,
)
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N test samples.")
@click.option("--batch", type=click.IntRange(1), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line.")
@friendly
def eval_(model, data, limit, batch, as_json):
    """Top-1 accuracy of MODEL with ONNX Runtime, on the CIFAR-10 test split or a labelled test set.

    The first output is read as class scores [N, classes] (argmax) or as class ids [N] or [N, 1]."""
    from hwtool.evaluate import evaluate
    from hwtool.report import progress_bar

    with progress_bar(console, "eval", disable=as_json) as bar:
        res = evaluate(model, data, limit=limit, batch=batch, on_batch=bar)
    if as_json:
        _echo_json(res.__dict__)
    else:
        out.print(f"{res.model}: top-1 {res.accuracy:.2%} ({res.correct}/{res.samples}) in {res.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------
# prune, gates, sweep


CALIB_HELP = (
    "Calibration inputs in the model's input layout: a .npy array (float32; integers for token ids), "
    "or for a model of several inputs an .npz of one array per input name."
)


def _echo_json(obj) -> None:
    """One line of strict JSON on stdout (a NaN or infinite figure becomes null)."""
    from hwtool.runtime import json_text

    click.echo(json_text(obj))


def _typed(names: tuple[str, ...]) -> list[str]:
    """Those of the options (by parameter name) typed on the command line, as spelled there."""
    ctx = click.get_current_context()
    defaults = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP, None)
    flags = {p.name: p.opts[0] for p in ctx.command.params}  # a parameter's first spelling: --from for init
    return [flags.get(n, "--" + n.replace("_", "-")) for n in names if ctx.get_parameter_source(n) not in defaults]


def _ignored_on_resume(settings: tuple[str, ...]) -> None:
    """One warning naming the settings typed with --resume: what the run trains comes from its
    checkpoint, only how it runs from this call (--teacher: where its teacher lives now)."""
    ignored = [name for name in _typed(settings) if name != "--teacher"]
    if ignored:
        click.echo(
            f"warning: {', '.join(ignored)} ignored with --resume: the run goes on with its checkpoint's settings",
            err=True,
        )


def _given(value, name: str):
    """The option's value if typed, else None: the function it goes to then takes its own default
    without the warnings that an asked-for value earns."""
    return value if _typed((name,)) else None


def _png(path) -> None:
    """--png writes PNG bytes: a path named for another format would hold what its name does not say."""
    if path is not None and Path(str(path)).suffix.lower() != ".png":
        raise ValueError(f"--png {path} names no .png file; the picture is a PNG: name it .png")


def _unused(names: tuple[str, ...], when: str) -> None:
    """Refuse options (by parameter name) typed where they do nothing, rather than ignore them."""
    typed = _typed(names)
    if typed:
        it, does = ("it", "does") if len(typed) == 1 else ("them", "do")
        raise ValueError(f"{' and '.join(typed)} {does} nothing {when}; drop {it}")


def _data_options_used(data, calib) -> None:
    """sweep's and quantize's --count and --limit: what they pick exists only with --data, and
    --count (calibration images from --data) not with --calib either."""
    if data is None:
        _unused(("count", "limit"), "without --data")
    elif calib is not None:
        _unused(("count",), "with --calib (it picks --data's calibration images)")


def _calibration(model_proto, calib, data, count, split):
    """Calibration inputs from --calib or --data (None when neither is given)."""
    from hwtool.gates import calibration_from_data, load_calibration

    if calib and data:
        raise ValueError("pass either --calib or --data, not both")
    if not data:
        _unused(("count", "split"), "without --data (they pick its calibration images)")
    if calib:
        return load_calibration(model_proto, calib)
    if data:
        return calibration_from_data(model_proto, data, count=_given(count, "count"), split=split)
    return None


def _calib_options(fn):
    fn = click.option(
        "--split",
        type=click.Choice(["train", "test"]),
        default="train",
        show_default=True,
        help="CIFAR-10 split the --data images come from.",
    )(fn)
    fn = click.option(
        "--count", type=click.IntRange(1), default=512, show_default=True, help="Calibration images taken from --data."
    )(fn)
    fn = click.option("--data", type=click.Path(), default=None, help="CIFAR-10 folder or .tar.gz.")(fn)
    fn = click.option("--calib", type=click.Path(), default=None, help=CALIB_HELP)(fn)
    return fn


@main.command("prune")
@click.argument("model", type=click.Path())
@click.option("--threshold", type=_Number(), default=None, help="Remove channels with mean T below.  [default: 0.05]")
@click.option(
    "--budget",
    type=_Number(),
    default=None,
    help="Instead of --threshold: keep at most this fraction of the parameters (0.1: remove 90%); the "
    "threshold becomes the lowest that fits, channels leaving lowest mean gate first across all blocks.",
)
@_calib_options
@click.option("-o", "--output", type=click.Path(), default=None, help="Default: MODEL.pruned.onnx.")
@click.option("--no-refit", is_flag=True, help="The paper's plain drop: no least-squares refit at all.")
@click.option(
    "--refit-gates-only",
    is_flag=True,
    help="Refit the kept gates only, not the transforms whose input the pruning upstream moved.",
)
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option(
    "--write-back",
    type=click.Choice(["auto", "gather", "scatter", "conv"]),
    default="auto",
    show_default=True,
    help="How the kept channels' mix returns into the full-width carry: Concat+Gather, ScatterElements, "
    "one-hot weights (1x1 conv or MatMul); auto: gather for convs, one-hot for fully connected layers.",
)
@click.option(
    "--round-to",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Keep a multiple of N channels per block (the next-highest gates fill up).",
)
@click.option(
    "--max-error",
    type=_Number(0),
    default=None,
    help="Fail, writing nothing, if the max abs output error on the calibration inputs is larger.",
)
@click.option("--threads", type=THREADS, default=None, help="ONNX Runtime threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly
def prune_cmd(
    model,
    threshold,
    budget,
    calib,
    data,
    count,
    split,
    output,
    no_refit,
    refit_gates_only,
    no_simplify,
    write_back,
    round_to,
    max_error,
    threads,
    as_json,
):
    """Remove low-gate channels from every highway block of MODEL."""
    from hwtool.prune import PruneConfig, prune
    from hwtool.report import progress_bar, prune_tables
    from hwtool.runtime import atomic_write_model, check_outputs, load_model

    if threshold is not None and budget is not None:
        raise ValueError("pass either --threshold or --budget, not both")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold {threshold} is outside [0, 1]; gates are sigmoids")
    if budget is not None and not 0.0 < budget <= 1.0:
        raise ValueError(f"--budget {budget} is not a fraction in (0, 1]; 0.1 keeps a tenth of the parameters")
    threshold = 0.05 if threshold is None else threshold
    if no_refit and refit_gates_only:
        raise ValueError("pass either --no-refit or --refit-gates-only, not both")
    src = Path(model)
    proto = load_model(src)
    dst = output if output is not None else str(src.with_name(src.stem + ".pruned.onnx"))
    check_outputs([dst], [model, calib, data])
    x = _calibration(proto, calib, data, count, split)
    cfg = PruneConfig(
        threshold=threshold,
        refit=not no_refit,
        refit_transforms=not refit_gates_only,
        simplify=not no_simplify,
        write_back=write_back,
        round_to=round_to,
        budget=budget,
        threads=threads,
    )
    with progress_bar(console, "prune", disable=as_json) as bar:
        pruned, report = prune(proto, calib=x, config=cfg, on_progress=bar.staged)  # its threshold or budget
    if max_error is not None:
        if report.calibration_images == 0:
            raise ValueError("--max-error needs calibration inputs to verify against (--calib or --data)")
        if report.max_abs_error is None:
            raise ValueError(
                "the model has no floating-point output for --max-error to measure (the verification's top-1 "
                "agreement is its measure); drop --max-error"
            )
        if not report.max_abs_error <= max_error:  # NaN fails too
            raise ValueError(
                f"max abs output error {report.max_abs_error:.4g} exceeds --max-error {max_error}; nothing written"
            )
    atomic_write_model(pruned, dst)
    if as_json:
        _echo_json({"output": str(dst), **report.to_dict()})
    else:
        for table in prune_tables(report):
            out.print(table)
        out.print(f"wrote {dst}")


@main.command("gates")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@_calib_options
@click.option("--png", type=click.Path(), default=None, help="Write the heat map here.")
@click.option("--unsorted", is_flag=True, help="Channels in original order (default: sorted by mean T).")
@click.option("--json", "as_json", type=click.Path(), default=None, help="Write per-block, per-channel means here.")
@friendly
def gates_cmd(models, calib, data, count, split, png, unsorted, as_json):
    """Mean gate T per block and channel of one or more MODELS: tables and a heat map."""
    from hwtool.gates import gates_from_metadata, measure_gates
    from hwtool.report import gate_heatmap, gate_table, progress_bar
    from hwtool.respell import highway_model
    from hwtool.runtime import atomic_write_files, check_distinct, check_outputs, json_file_bytes, load_model

    if png is None:
        _unused(("unsorted",), "without --png (it orders the heat map's channels)")
    check_distinct(models)
    check_outputs([png, as_json], [*models, calib, data])
    _png(png)
    panels = []
    for path in models:
        proto, blocks = highway_model(load_model(path))
        x = _calibration(proto, calib, data, count, split)
        if x is None:
            stats = gates_from_metadata(proto, blocks)
            if stats is None:
                raise ValueError(f"{path} has no gate statistics in its metadata; pass --calib or --data")
        else:
            with progress_bar(console, f"gates {Path(path).name}") as bar:
                stats, _ = measure_gates(proto, blocks, x, on_batch=bar)
        panels.append((f"{Path(path).name}: {stats.source}", [m.tolist() for m in stats.means]))
    for title, means in panels:
        out.print(gate_table(title, means))
    files = {}
    if png:
        files[png] = gate_heatmap(panels, sort=not unsorted)
    if as_json:
        doc = [
            {"model": str(p), "source": t.removeprefix(f"{Path(p).name}: "), "blocks": m}
            for p, (t, m) in zip(models, panels)
        ]
        files[as_json] = json_file_bytes(doc, indent=None)
    atomic_write_files(files)
    if files:
        out.print(f"wrote {', '.join(map(str, files))}")


@main.command("sweep")
@click.argument("model", type=click.Path())
@click.option(
    "--data",
    type=click.Path(),
    default=None,
    help="Test accuracy on CIFAR-10 (a folder or .tar.gz) or on " + TEST_SET_HELP + " Without it, --calib: "
    "agreement with the original on it.",
)
@click.option("--thresholds", default=None, help="Comma-separated.  [default: 0,0.01,0.02,0.05,0.1,0.2]")
@click.option(
    "--budgets",
    default=None,
    help="Comma-separated parameter budgets, as prune --budget: a row each at the lowest threshold that "
    "keeps at most that fraction (with or instead of --thresholds).",
)
@click.option(
    "--calib", type=click.Path(), default=None, help=CALIB_HELP + " Default with CIFAR-10 --data: --count train images."
)
@click.option("--count", type=click.IntRange(1), default=512, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N test samples.")
@click.option("--no-refit", is_flag=True, help="The paper's plain drop.")
@click.option("--refit-gates-only", is_flag=True, help="Refit the kept gates only, as prune --refit-gates-only.")
@click.option(
    "--latency",
    is_flag=True,
    help="Also measure ORT CPU latency (batch 1 and 64; a model whose batch is fixed at 1 or 64 at that one).",
)
@click.option("--csv", "csv_path", type=click.Path(), default=None, help="Default: MODEL.sweep.csv.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Default: MODEL.sweep.json.")
@click.option("--png", type=click.Path(), default=None, help="Default: MODEL.sweep.png.")
@friendly
def sweep_cmd(
    model, data, thresholds, budgets, calib, count, limit, no_refit, refit_gates_only, latency, csv_path, json_path, png
):
    """Prune MODEL at each threshold and tabulate accuracy, size, FLOPs (and latency).

    A model of other inputs than CIFAR-10 images takes its own labelled test set (--data FILE.npz,
    with --calib) for accuracy, or is swept on --calib alone: each threshold's top-1 agreement with
    the original on those inputs (or, for outputs that are not class scores, the max abs
    difference) instead of accuracy.
    """
    from hwtool.evaluate import is_test_npz, load_test_set
    from hwtool.gates import calibration_from_data, load_calibration
    from hwtool.prune import PruneConfig
    from hwtool.report import progress_bar, sweep_plot, sweep_table
    from hwtool.runtime import atomic_write_files, check_outputs, load_model
    from hwtool.sweep import csv_bytes, json_bytes, quality, sweep

    if no_refit and refit_gates_only:
        raise ValueError("pass either --no-refit or --refit-gates-only, not both")
    _data_options_used(data, calib)
    if thresholds is None and budgets is None:
        thresholds = "0,0.01,0.02,0.05,0.1,0.2"
    ths = _floats(thresholds, "--thresholds") if thresholds is not None else ()
    buds = _floats(budgets, "--budgets") if budgets is not None else ()
    for b in buds:
        if not 0.0 < b <= 1.0:
            raise ValueError(f"--budgets: {b} is not a fraction in (0, 1]; 0.1 keeps a tenth of the parameters")
    proto = load_model(model)
    stem = Path(model).with_suffix("")
    csv_path = csv_path if csv_path is not None else f"{stem}.sweep.csv"
    json_path = json_path if json_path is not None else f"{stem}.sweep.json"
    png = png if png is not None else f"{stem}.sweep.png"
    check_outputs([csv_path, json_path, png], [model, calib, data])
    _png(png)
    x = load_calibration(proto, calib) if calib else None
    test = load_test_set(proto, data, limit) if data else None
    if test is not None and x is None and not is_test_npz(data):
        x = calibration_from_data(proto, data, count=_given(count, "count"))
    with progress_bar(console, "sweep") as bar:
        rows = sweep(
            proto,
            test,
            ths,
            calib=x,
            calib_count=_given(count, "count"),
            limit=limit,
            config=PruneConfig(refit=not no_refit, refit_transforms=not refit_gates_only),
            latency=latency,
            on_progress=bar.staged,
            budgets=buds,
        )
    out.print(sweep_table(rows, model))
    measure = quality(rows)
    meta = {
        "model": str(model),
        "refit": not no_refit,
        "refit_transforms": not no_refit and not refit_gates_only,
        "test": None if test is None else test.source,
        "test_samples": None if test is None else len(test),
        "calibration": calib or f"{count} train images",
        "measure": measure,
        "budgets": list(buds),
    }
    plot_rows = [{"threshold": r.threshold, measure: getattr(r, measure), "bytes": r.bytes} for r in rows[1:]]
    title = f"{Path(model).name}: {measure.replace('_', ' ')} and size vs gate threshold"
    atomic_write_files(
        {csv_path: csv_bytes(rows), json_path: json_bytes(rows, meta), png: sweep_plot(plot_rows, title, measure)}
    )
    out.print(f"wrote {csv_path}, {json_path}, {png}")


# ---------------------------------------------------------------------------------------------
# --- bench, quantize, convert ---
# Deployment commands: no torch, directly or through imports.


def _names(text: str, option: str) -> tuple[str, ...]:
    return tuple(_items(text, "names", option))


def _quantize_ops(text: str) -> tuple[str, ...] | str | None:
    """--ops: 'all' (None: every op ORT can), 'auto', or op type names."""
    word = text.strip().lower()
    return None if word == "all" else "auto" if word == "auto" else _names(text, "--ops")


@main.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--batch", default="1,64", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", type=THREADS, default=None, help="Intra-op threads (default: ORT's, one per core).")
@click.option(
    "--warmup", type=click.IntRange(0), default=10, show_default=True, help="Untimed runs per model and batch."
)
@click.option("--runs", type=click.IntRange(1), default=100, show_default=True, help="Timed runs per model and batch.")
@click.option(
    "--seconds",
    type=_Number(0, min_open=True),
    default=None,
    help="Time about this long per batch and model instead of --runs: the models share SECONDS x their "
    "number, run for run, so each gets the same number of runs.",
)
@click.option(
    "--provider",
    default="cpu",
    show_default=True,
    help="Comma-separated: cpu, cuda, tensorrt, openvino, xnnpack, coreml, nnapi, directml, qnn, ...",
)
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the random input.")
@click.option(
    "--dims",
    default=None,
    help="Sizes of symbolic input dimensions other than the batch, as NAME=SIZE,... (a sequence length).",
)
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write every figure to this JSON file.")
@friendly
def bench_cmd(models, batch, threads, warmup, runs, seconds, provider, seed, dims, json_path):
    """Latency and throughput of MODELS with ONNX Runtime; the first model is the baseline."""
    from hwtool.bench import BenchConfig, bench, placement_lines, table, write_json
    from hwtool.report import progress_bar
    from hwtool.runtime import check_outputs

    check_outputs([json_path], models)
    if seconds is not None:
        _unused(("runs",), "with --seconds (which sets how long each model runs instead)")
    cfg = BenchConfig(
        batches=_ints(batch, "--batch", unique=True),
        threads=threads,
        warmup=warmup,
        runs=runs,
        seconds=seconds,
        providers=_names(provider, "--provider"),
        seed=seed,
        dims=_sizes(dims, "--dims"),
    )
    with progress_bar(console, "bench") as bar:
        res = bench(list(models), cfg, on_run=bar, on_stage=bar.stage)
    if not res.timings:
        why = "; ".join(f"{prov}: {why}" for prov, why in res.skipped)
        raise ValueError(f"no requested provider is in this onnxruntime build, nothing was measured ({why})")
    for prov, why in res.skipped:
        console.print(f"skipped {prov}: {why}", soft_wrap=True)
    for line in placement_lines(res):
        console.print(line)
    out.print(table(res))
    if json_path:
        write_json(res, json_path)
        console.print(f"wrote {json_path}")


@main.command("quantize")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="int8 ONNX file to write.")
@click.option("--calib", type=click.Path(), default=None, help=CALIB_HELP)
@click.option(
    "--data",
    type=click.Path(),
    default=None,
    help="CIFAR-10: calibration from train, accuracy on test. Or accuracy (with --calib) on " + TEST_SET_HELP,
)
@click.option("--count", type=click.IntRange(1), default=512, show_default=True, help="Calibration images from --data.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Measure accuracy on the first N test samples.")
@click.option(
    "--method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default="percentile",
    show_default=True,
    help="Activation range calibration (entropy: ONNX Runtime's quantize_static gives its KL search one "
    "candidate, the whole range, so it equals minmax).",
)
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel.")
@click.option(
    "--activations",
    type=click.Choice(["uint8", "int8"]),
    default="uint8",
    show_default=True,
    help="Activation type: uint8 is what x86 CPUs run fast; int8 suits Arm.",
)
@click.option(
    "--ops",
    default="auto",
    show_default=True,
    help="Comma-separated op types to quantize; 'auto': the convolutions, or in a network without any its "
    "fully connected layers (Gemm, MatMul); 'all': every op ORT can (the gate's sigmoid and mix too).",
)
@click.option("--no-preprocess", is_flag=True, help="Skip ORT's quant_pre_process.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON line.")
@friendly
def quantize_cmd(
    model, output, calib, data, count, limit, method, per_tensor, activations, ops, no_preprocess, as_json
):
    """Static int8 quantization (QDQ, per-channel weights) of MODEL with ONNX Runtime."""
    from hwtool.quantize import QuantizeConfig, quantize
    from hwtool.report import progress_bar

    _data_options_used(data, calib)
    cfg = QuantizeConfig(
        per_channel=not per_tensor,
        activations=activations,
        method=method,
        ops=_quantize_ops(ops),
        preprocess=not no_preprocess,
    )
    with progress_bar(console, "quantize", disable=as_json) as bar:
        res = quantize(
            model,
            output,
            calib=calib,
            data=data,
            count=_given(count, "count"),
            limit=limit,
            config=cfg,
            on_batch=bar,
            on_stage=bar.stage,
        )
    if as_json:
        _echo_json(res.to_dict())
        return
    out.print(
        f"wrote {res.output}: {res.bytes_before:,} -> {res.bytes_after:,} bytes ({res.size_ratio:.2f}x), "
        f"{res.quantized_nodes} Q/DQ nodes, calibrated on {res.calib_samples} samples"
    )
    if res.accuracy_before is not None:
        out.print(
            f"top-1 on {res.test_samples} test samples: float {res.accuracy_before:.2%}, "
            f"int8 {res.accuracy_after:.2%}; predictions agree on {res.agreement:.1%}"
        )


@main.command("convert")
@click.argument("model", type=click.Path())
@click.option(
    "--to",
    "fmt",
    type=click.Choice(["ort", "float16"]),
    default="ort",
    show_default=True,
    help="ort: the ORT format for ONNX Runtime Mobile; float16: half the size, for GPU, WebGPU and mobile "
    "accelerators.",
)
@click.option("-o", "--output", type=click.Path(), default=None, help="Default: MODEL.ort, or MODEL.fp16.onnx.")
@click.option(
    "--target",
    type=click.Choice(["portable", "arm", "amd64"]),
    default=None,
    help="ort: portable (the default) and arm leave out x86-only NCHWc layouts; arm keeps int8 QDQ kernels.",
)
@click.option(
    "--half-io", is_flag=True, help="float16: inputs and outputs float16 too (default: float32, cast inside)."
)
@click.option(
    "--calib", type=click.Path(), default=None, help="float16: compare with the float32 model on these. " + CALIB_HELP
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON line.")
@friendly
def convert_cmd(model, fmt, output, target, half_io, calib, as_json):
    """Convert MODEL to the ORT format for ONNX Runtime Mobile (with its reduced-operator config),
    or to float16; either is checked against MODEL before it is written."""
    if fmt == "float16":
        if target is not None:
            raise ValueError("--target is for --to ort; a float16 model runs on any target")
        return _convert_float16(model, output, half_io, calib, as_json)
    if half_io or calib:
        raise ValueError(f"{'--half-io' if half_io else '--calib'} is for --to float16")
    from hwtool.convert import convert_to_ort

    res = convert_to_ort(model, output, target=target or "portable")
    if as_json:
        _echo_json(res.to_dict())
        return
    ops = sum(len(v) for v in res.operators.values())
    out.print(f"wrote {res.output} ({res.ort_bytes:,} bytes, {res.nodes} nodes) and {res.config} ({ops} operators)")
    out.print(f"ORT vs ONNX model on random inputs (batch {res.verify_batch}): max abs diff {res.max_abs_diff:.2e}")


def _convert_float16(model, output, half_io, calib, as_json):
    """convert --to float16."""
    from hwtool.convert import convert_to_float16

    res = convert_to_float16(model, output, half_io=half_io, calib=calib)
    if as_json:
        _echo_json(res.to_dict())
        return
    io = "float16" if res.half_io else "float32"
    edges = ", ".join([*res.float_inputs, *res.float_outputs]) or "none"
    out.print(
        f"wrote {res.output}: {res.bytes_after / 1e6:.2f} MB ({res.bytes_after / res.bytes_before:.2f}x of "
        f"{res.bytes_before / 1e6:.2f} MB), {io} inputs and outputs: {edges}"
    )
    if res.clamped or res.flushed:
        out.print(
            f"of {res.weights:,} weights, {res.clamped:,} beyond ±65504 were clamped and {res.flushed:,} under "
            "6e-8 became 0"
        )
    agree = "" if res.top1_agreement is None else f", top-1 agreement {res.top1_agreement:.2%}"
    if res.integer_agreement is not None:
        agree += f", integer outputs agree on {res.integer_agreement:.2%}"
    diff = (
        "no float output to compare"
        if res.max_abs_diff is None
        else f"max abs diff {res.max_abs_diff:.2e} ({res.max_rel_diff:.2%} of the largest output)"
    )
    out.print(f"float16 vs float32 on {res.verify_samples} {res.verify_inputs} samples: {diff}{agree}")
