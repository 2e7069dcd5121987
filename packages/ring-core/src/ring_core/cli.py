"""The ``ring-attention`` command: ``info``, ``verify`` and ``bench``, and the subcommands plugins register."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from . import bench as bench_lib
from .factory import create_attention, explain_auto, resolve_implementation
from .kernels import KernelBackend
from .registry import Implementation, get_registry, list_implementations, list_kernels, plugin_errors
from .testing import CASES, QUICK_CASES, Case, DistributedCaseResult, check_attention, format_table
from .validation import check_dilated_config, check_window

__all__ = [
    "UsageError",
    "build_parser",
    "check_output",
    "main",
    "positive_int",
]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CPU_FLOPS = 2e11  # an optimistic CPU attention throughput (FLOP/s), for refusing runs that would not end
_MAX_CPU_SECONDS = 1800


class UsageError(ValueError):
    """A bad command-line argument, found before any work: one line on stderr, exit code 2 (subcommands raise it)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: message (see prog --help)``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse ``type``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def check_output(option: str, path: str | None, *, plot: bool = False) -> None:
    """A file to write (``--json``, ``--plot``, ``--out``): its folder exists, and a plot's matplotlib is installed;
    else :class:`UsageError`."""
    if not path:
        return
    if not Path(path).resolve().parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {Path(path).resolve().parent} does not exist")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f'{option} needs matplotlib: pip install "ring-core[plot]" (or leave out {option})')


def _check_names(names: Sequence[str] | None, device: str) -> None:
    """Every ``--impl`` name is an available attention implementation for ``device``."""
    usable = {i.name: i for i in list_implementations("attention") if i.available and device in i.devices}
    for name in names or ():
        if name not in usable:
            impl = next((i for i in list_implementations() if i.name == name), None)
            why = "is not a registered attention implementation"
            if impl is not None:
                why = "is not available here: " + ("; ".join(impl.reasons) or f"it does not run on {device}")
            raise UsageError(f"--impl {name!r} {why}; choose from {', '.join(sorted(usable))}")


def _check_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {device!r} is not a device ({exc})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: no CUDA device is available here")
    return parsed


def _yes_or_reasons(reasons: Sequence[str]) -> str:
    return "yes" if not reasons else "no: " + "; ".join(reasons)


def _windows(kernel: KernelBackend) -> str:
    """How a kernel takes sliding windows: itself, as a mask (window tiles), or not at all."""
    return "native" if kernel.supports_window else "mask" if kernel.supports_mask else "no"


def _cmd_info(args: argparse.Namespace) -> int:
    if args.name:
        return _info_implementation(args.name)
    registry = get_registry()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA device: {cuda}\n")
    print("Plugins")
    rows: list[tuple[object, ...]] = [(p.name, p.package or "-", p.version or "-", "loaded") for p in registry.plugins]
    rows += [(p.name, p.package or "-", p.version or "-", f"FAILED: {p.error}") for p in plugin_errors()]
    rows += [(p.name, p.package or "-", p.version or "-", p.error) for p in registry.disabled]
    print(format_table(rows, ["plugin", "package", "version", "status"]))
    print("\nImplementations")
    rows = [
        (
            i.name,
            i.cls.__name__,
            i.package,
            i.kind,
            _yes_or_reasons(i.reasons),
            ", ".join(f"{a} (removed in {v})" for a, v in i.aliases.items()) or "-",
        )
        for i in list_implementations()
    ]
    print(format_table(rows, ["name", "class", "package", "kind", "available", "deprecated aliases"]))
    print("\nKernel backends (dispatch order)")
    rows = [
        (
            k.name,
            k.priority,
            ",".join(k.devices) or "any",
            _windows(k),
            "yes" if k.supports_varlen else "no",
            _yes_or_reasons(k.availability_reasons()),
            k.description,
        )
        for k in list_kernels()
    ]
    print(format_table(rows, ["kernel", "priority", "devices", "windows", "varlen", "available", "description"]))
    for kernel in list_kernels():
        lines = kernel.details()
        if lines:
            print(f"\nKernel '{kernel.name}'")
            print("\n".join(lines))
    try:
        _, lines = explain_auto("attention")
        print("\n'auto' (attention): " + lines[-1])
    except KeyError as exc:
        print(f"\n'auto' (attention): {exc}")
    return 0


class _CaseLines:
    """``verify``'s output: a header, then one aligned line per case as soon as it is checked."""

    def __init__(self, total: int, names: Sequence[str], cases: Sequence[str]) -> None:
        self.total, self.done, self.failures = total, 0, 0
        self.widths: tuple[int, ...] = (
            len(str(total)) * 2 + 3,
            max(map(len, names), default=0),
            max(map(len, cases), default=0),
        )
        self.widths = tuple(max(w, len(h)) for w, h in zip(self.widths, ("", "implementation", "case")))

    def header(self) -> None:
        cells = ("", "implementation", "case", "dtype", "err out", "max err grad", "result")
        print(self._format(cells), flush=True)

    def _format(self, cells: Sequence[str]) -> str:
        progress, impl, case, *rest = cells
        head = f"{progress:<{self.widths[0]}}  {impl:<{self.widths[1]}}  {case:<{self.widths[2]}}"
        return (head + "  " + "  ".join(f"{c:<{w}}" for c, w in zip(rest, (8, 7, 12, 0)))).rstrip()

    def line(self, impl: str, case: str, dtype: torch.dtype, errors: dict[str, float], status: str) -> None:
        self.done += 1
        self.failures += status != "PASS"
        grad = max((e for n, e in errors.items() if n != "out"), default=float("nan"))
        out = errors.get("out", float("nan"))
        progress = f"[{self.done:>{len(str(self.total))}}/{self.total}]"
        dtype_name = str(dtype).replace("torch.", "")
        print(self._format((progress, impl, case, dtype_name, f"{out:.1e}", f"{grad:.1e}", status)), flush=True)

    def summary(self) -> int:
        print(f"\n{self.done - self.failures} passed, {self.failures} failed")
        return 1 if self.failures else 0


def _info_implementation(name: str) -> int:
    """One implementation: where it comes from, whether it runs here, and every argument it accepts."""
    from .arguments import format_arguments
    from .factory import UnknownImplementationError

    try:
        impl = next(i for i in list_implementations() if name in (i.name, i.cls.__name__, *i.aliases))
    except StopIteration:
        try:  # the factory's message: what to install, or the closest known name
            resolve_implementation(name)
        except UnknownImplementationError as exc:
            print(exc)
        return 1
    print(f"{impl.name}: {impl.description}")
    print(f"class {impl.cls.__module__}.{impl.cls.__qualname__}, package {impl.package}, kind {impl.kind}")
    print(f"available here: {_yes_or_reasons(impl.reasons)}")
    if impl.aliases:
        print("deprecated names: " + ", ".join(f"{a} (removed in {v})" for a, v in impl.aliases.items()))
    print("\n" + format_arguments(impl))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    _check_device(args.device)
    _check_names(args.impl, torch.device(args.device).type)
    cases = CASES if args.full else QUICK_CASES
    dtypes = [_DTYPES[d] for d in args.dtype]
    impls = [i for i in list_implementations("attention") if i.available and (not args.impl or i.name in args.impl)]
    if args.world_size > 1:
        impls = [i for i in impls if i.distributed]
    if not impls:
        print("no available attention implementation matches", args.impl or "")
        return 1
    if args.world_size > 1:
        return _verify_distributed(args, impls, cases, dtypes)
    lines = _CaseLines(len(impls) * len(cases) * len(dtypes), [i.name for i in impls], [c.name for c in cases])
    print(f"{lines.total} checks against the float64 reference (forward and backward, relative errors)")
    lines.header()
    for impl in impls:
        for case in cases:
            for dtype in dtypes:
                module = create_attention(impl.name, **case.config, **impl.options)
                try:
                    result = check_attention(module, case, dtype, device=args.device, seed=lines.done)
                    errors, status = result.errors, "PASS" if result.passed else "FAIL"
                except Exception as exc:  # report, keep going
                    errors, status = {}, f"ERROR {type(exc).__name__}: {exc}"
                lines.line(impl.name, case.name, dtype, errors, status)
    return lines.summary()


def _verify_distributed(
    args: argparse.Namespace, impls: Sequence[Implementation], cases: Sequence[Case], dtypes: Sequence[torch.dtype]
) -> int:
    """Each distributed implementation on ``--world-size`` gloo processes, every rank vs the reference rows."""
    from .testing import check_distributed, fit_case

    if args.device != "cpu":
        print(f"--world-size runs gloo processes on the CPU; got --device {args.device}")
        return 1
    labels = [f"{c.name} (N={fit_case(c, args.world_size).seq_len})" for c in cases]
    lines = _CaseLines(len(impls) * len(cases) * len(dtypes), [i.name for i in impls], labels)
    print(f"{lines.total} checks on {args.world_size} gloo processes against the float64 reference")
    print("(errors: the worst over the ranks; one group of processes per implementation and dtype)")
    lines.header()
    for impl in impls:
        for dtype in dtypes:

            def on_result(
                result: DistributedCaseResult, impl: Implementation = impl, dtype: torch.dtype = dtype
            ) -> None:
                errors = {n: max(e[n] for e in result.rank_errors) for n in result.rank_errors[0]}
                case = f"{result.case.name} (N={result.case.seq_len})"
                lines.line(impl.name, case, dtype, errors, "PASS" if result.passed else "FAIL")

            before = lines.done
            try:
                check_distributed(
                    impl.name, cases, args.world_size, dtype, options=impl.options, seed=before, on_result=on_result
                )
            except Exception as exc:  # report, keep going
                lines.line(impl.name, "(the rest)", dtype, {}, f"ERROR {type(exc).__name__}: {exc}")
                lines.done = before + len(cases)
    return lines.summary()


def _check_bench(args: argparse.Namespace, device: torch.device, jobs: int) -> None:
    """Everything ``bench`` needs, before any work: names, configuration, outputs, and an end in sight."""
    _check_names(args.impl, device.type)
    try:
        check_dilated_config(args.segments, args.rates)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--segments/--rates: {exc}") from None
    if args.window is not None:
        try:
            check_window(tuple(args.window))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--window: {exc}") from None
    check_output("--json", args.json)
    check_output("--plot", args.plot, plot=True)
    if device.type == "cpu" and not args.force:
        per_run = [bench_lib.fwd_bwd_flops(bench_lib.dense_pairs(n, args.heads), args.head_dim, args.batch)
                   for n in args.seq_lens]  # fmt: skip
        seconds = sum(per_run) * (args.repeats + 1) * jobs / _CPU_FLOPS
        if seconds > _MAX_CPU_SECONDS:
            raise UsageError(
                f"--seq-lens {' '.join(map(str, args.seq_lens))} on the CPU: about {seconds / 3600:.1f} h even at "
                f"{_CPU_FLOPS:.0e} FLOP/s ({max(per_run):.1e} FLOP in the largest run); choose shorter sequences, "
                "or pass --force to run anyway"
            )


def _cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = _check_device(args.device)
    dtype = _DTYPES[args.dtype]
    config = {"segment_lengths": args.segments, "dilation_rates": args.rates}
    impls = [
        i
        for i in list_implementations("attention")
        if i.available and device.type in i.devices and (not args.impl or i.name in args.impl)
    ]
    if args.window is not None:
        config["window_size"] = tuple(args.window)
    _check_bench(args, device, 1 + len(impls))
    b, h, d = args.batch, args.heads, args.head_dim
    jobs = [(n, None) for n in args.seq_lens] + [(n, impl) for n in args.seq_lens for impl in impls]
    results: list[bench_lib.BenchResult] = []
    fn: Callable[[], torch.Tensor]
    # a bar on a terminal; in a log (not a terminal) nothing but the table
    for n, impl in tqdm(jobs, desc="bench", unit="run", file=sys.stderr, disable=None):
        q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        kernel = None
        forward = {} if args.documents is None else {"cu_seqlens": bench_lib.packed_cu_seqlens(n, args.documents)}
        if impl is None:
            name, pairs = "sdpa", bench_lib.dense_pairs(n, h, args.causal)
            kernel = bench_lib.sdpa_kernel_name(q.transpose(1, 2), args.causal)

            def sdpa(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> torch.Tensor:
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=args.causal
                )

            fn = sdpa
        else:
            options = impl.options if impl.bench_options is None else impl.bench_options
            module = create_attention(impl.name, **config, **options)
            name, pairs = impl.name, bench_lib.useful_pairs(n, h, args.segments, args.rates, causal=args.causal)

            def run(
                q: torch.Tensor = q,
                k: torch.Tensor = k,
                v: torch.Tensor = v,
                module: torch.nn.Module = module,
                forward: dict[str, torch.Tensor] = forward,
            ) -> torch.Tensor:
                out: torch.Tensor = module(q, k, v, is_causal=args.causal, **forward)
                return out

            fn = run

        results.append(bench_lib.measure(name, fn, pairs, d, b, n, device, args.repeats, kernel=kernel))
        path = getattr(module, "last_path", None) if impl is not None else None
        if path:
            results[-1].kernel = path  # the path it ran (varlen, segments, ...) and its kernel
        del q, k, v
    baseline = {r.seq_len: r.time_ms for r in results if r.name == "sdpa"}
    for r in results:
        r.speedup_vs_sdpa = baseline[r.seq_len] / r.time_ms
    results.sort(key=lambda r: (r.seq_len, r.name != "sdpa", r.name))
    card = bench_lib.device_name(device)
    title = (
        f"{card}, {args.dtype}, B={b} H={h} D={d}, segments {args.segments} rates {args.rates}"
        f"{', causal' if args.causal else ''}"
        f"{f', window {tuple(args.window)}' if args.window else ''}"
        f"{f', {args.documents} packed documents' if args.documents else ''}; forward+backward"
    )
    print(bench_lib.format_results(results, title))
    meta = {
        "card": card,
        "torch": torch.__version__,
        "title": title,
        "date": datetime.date.today().isoformat(),
        "command": "ring-attention " + " ".join(sys.argv[1:]),
        **vars(args),
    }
    meta.pop("func", None)
    if args.json:
        bench_lib.write_json(args.json, meta, results)
        print(f"wrote {args.json}")
    if args.plot:
        bench_lib.plot(args.plot, results, title)
        print(f"wrote {args.plot}")
    return 0


class _VersionAction(argparse.Action):
    """``--version``: ring-core's version and each loaded plugin package's, read only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from . import __version__

        packages = {p.package: p.version for p in get_registry().plugins if p.package and p.package != "ring-core"}
        plugins = "".join(f", {name} {version}" for name, version in sorted(packages.items()))
        print(f"ring-attention (ring-core {__version__}{plugins}; torch {torch.__version__})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ring-attention", description=__doc__)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="plugins, implementations and kernel backends")
    info.add_argument("--name", help="one implementation (name, class or old name): what it accepts")
    info.set_defaults(func=_cmd_info)

    verify = sub.add_parser("verify", help="check every available implementation against the reference")
    verify.add_argument("--impl", nargs="*", help="only these implementations")
    verify.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=list(_DTYPES))
    verify.add_argument("--device", default="cpu")
    verify.add_argument("--full", action="store_true", help="every conformance case, not a quick subset")
    verify.add_argument(
        "--world-size", type=positive_int, default=1, help="run the distributed implementations on P gloo processes"
    )
    verify.set_defaults(func=_cmd_verify)

    bench = sub.add_parser("bench", help="time implementations against plain SDPA")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default=None, choices=list(_DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    bench.add_argument("--seq-lens", nargs="+", type=positive_int, default=[1024, 2048, 4096])
    bench.add_argument("--batch", type=positive_int, default=1)
    bench.add_argument("--heads", type=positive_int, default=8)
    bench.add_argument("--head-dim", type=positive_int, default=64)
    bench.add_argument("--segments", nargs="+", type=int, default=[512, 1024, 2048])
    bench.add_argument("--rates", nargs="+", type=int, default=[1, 2, 4])
    bench.add_argument("--causal", action="store_true")
    bench.add_argument(
        "--window", nargs=2, type=int, metavar=("LEFT", "RIGHT"), help="a sliding window_size (-1: unbounded)"
    )
    bench.add_argument(
        "--documents", type=positive_int, help="pack this many documents of random lengths (seed 0) per sequence (B=1)"
    )
    bench.add_argument("--repeats", type=positive_int, default=3)
    bench.add_argument("--impl", nargs="*", help="only these implementations")
    bench.add_argument("--json", help="write results as JSON")
    bench.add_argument("--plot", help="write a PNG plot")
    bench.add_argument("--force", action="store_true", help="run even when the CPU would take hours")
    bench.set_defaults(func=_cmd_bench)

    for name, add_parser in sorted(get_registry().commands.items()):  # e.g. ring-blocksparse's `pattern`
        if name in sub.choices:
            print(f"ring-attention: plugin subcommand {name!r} clashes with an existing one; skipped", file=sys.stderr)
            continue
        add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "dtype", None) is None and args.command == "bench":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    try:
        code: int = args.func(args)
        return code
    except UsageError as exc:  # a subcommand's argument check, before any work
        print(f"ring-attention {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
