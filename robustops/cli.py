"""The ``robustops`` command line.

    robustops report  [options]   the whole robustness report: OUT/index.html, PNGs, results.json
    robustops attack  [options]   section 1 only: clean / FGSM / PGD / DeepFool / C&W / AutoAttack
    robustops fragile [options]   section 2 only: fragile kernels of the first conv layer, SVD filter
    robustops detect  [options]   section 3 only: relevant-neuron detector vs Feature Squeezing vs NIC
    robustops explain [options]   section 4 only: LRP / Grad-CAM heatmaps, UMAP of LRP signatures
    robustops bench   [options]   section 5 only: compiled ops vs their eager references, in this run
    robustops info                version, how the compiled core was built, optional parts present

Common options: ``--data {digits,fashion-mnist,mnist,cifar10} --root PATH``, ``--model ARCH``
(a ``robustops.models`` name) with ``--weights PATH`` (a state_dict, loaded with
``weights_only=True``) or ``--torchscript PATH``, ``--device``, ``--seed``, ``--out DIR``,
``--quick``, ``--json``. Without a model the embedded default runs: ``small_cnn`` and its
compact-convolution twin trained on scikit-learn's digits (nothing is downloaded).

Bad input (missing data, unknown architecture, corrupt or mismatched checkpoint, unwritable
``--out``) exits with code 2 and one line naming the problem and the fix; ``--debug`` shows the
traceback of any error. Progress bars (tqdm) only when stderr is a terminal. Under ``torchrun``
the evaluation loops are sharded over the ranks; rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

_COMMANDS = {
    "report": (None, "the whole robustness report (HTML + figures + JSON)"),
    "attack": ("robustness", "robustness under attacks: FGSM curve, PGD, DeepFool, C&W-L2, AutoAttack, timings"),
    "fragile": ("fragile", "fragile / null kernels of the first conv layer, targeting, SVD filter"),
    "detect": ("detection", "adversarial-input detectors: relevant neurons vs Feature Squeezing vs NIC"),
    "explain": ("explanations", "LRP and per-neuron Grad-CAM heatmaps, map of LRP signatures"),
    "bench": ("speed", "time the compiled ops against their eager references on this run's model"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (problem + where to look) and exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _common(p: argparse.ArgumentParser, command: str) -> None:
    from .report import DATA_CHOICES

    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="digits", choices=DATA_CHOICES,
                   help="data set (default: digits, embedded in scikit-learn, no download)")
    g.add_argument("--root", default=None, metavar="PATH", help="folder with the data files (not for digits)")
    g.add_argument("--model", default=None, metavar="ARCH",
                   help="robustops.models architecture (small_cnn, papernot_mnist, lenet, vgg11, resnet18, ...); "
                        "trained here unless --weights is given (default: small_cnn + its CCN twin)")
    g.add_argument("--weights", default=None, metavar="PATH",
                   help="state_dict for --model (torch.save(model.state_dict(), PATH)), loaded with weights_only=True")
    g.add_argument("--torchscript", default=None, metavar="PATH", help="a TorchScript model (torch.jit.save)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--seed", type=int, default=0, help="seed of training, attacks and projections (default: 0)")
    default_out = "report" if command == "report" else None
    g.add_argument("--out", default=default_out, metavar="DIR",
                   help="write index.html, PNG figures and results.json here" +
                        (" (default: report)" if command == "report" else " (default: print only)"))
    g.add_argument("--quick", action="store_true", help="small settings: seconds on digits (tests, a first look)")
    g.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of the table")
    g.add_argument("--epochs", type=int, default=None, help="training epochs when the model is trained here")
    g.add_argument("--eps", type=float, default=None, help="L-inf budget of PGD / AutoAttack / filter (pixels in [0, 1])")
    g.add_argument("--limit", type=int, default=None, help="number of evaluation images (default: all of digits' 450)")
    g.add_argument("--train-limit", type=int, default=None, help="number of training images")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 avoids oversubscription on a busy machine)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars even on a terminal")
    g.add_argument("--debug", action="store_true", help="show the traceback of any error")
    if command == "report":
        from .report import SECTION_NAMES

        g.add_argument("--sections", nargs="+", default=None, metavar="NAME",
                       help=f"run only these sections: {', '.join(SECTION_NAMES)}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustops", description="robustops: robustness reports, attacks, fragile kernels, "
                     "detectors, explanations and compiled-op benchmarks for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (_, helptext) in _COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        _common(p, name)
    p = sub.add_parser("info", help="version, how the compiled core was built, optional parts present",
                       description="print the robustops version, build_info() and which optional parts import")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--debug", action="store_true", help="show the traceback of any error")
    return parser


def _optional_parts() -> dict:
    import importlib
    import importlib.util

    parts = {}
    for label, mod, attr in (("robustops.detect", "robustops.detect", "RelevantNeuronDetector"),
                             ("robustops.xai", "robustops.xai", "lrp"),
                             ("AutoAttack", "robustops.attacks", "AutoAttack"),
                             ("umap-learn", "umap", None), ("matplotlib", "matplotlib", None), ("tqdm", "tqdm", None)):
        if attr is None:  # third-party: installed or not (importing umap compiles for seconds)
            parts[label] = importlib.util.find_spec(mod) is not None
            continue
        try:
            m = importlib.import_module(mod)
            parts[label] = bool(attr is None or hasattr(m, attr))
        except Exception:
            parts[label] = False
    return parts


def _info(args) -> int:
    import torch

    import robustops

    info = {"version": robustops.__version__, "build_info": robustops.build_info(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "optional": _optional_parts()}
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"robustops {info['version']}")
    print(f"build_info: {json.dumps(info['build_info'], default=str)}")
    print(f"torch {info['torch']}, CUDA available: {info['cuda_available']}")
    print("optional parts: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["optional"].items()))
    return 0


def _run(args) -> int:
    from .report import _shard, generate

    if args.threads is not None:
        from .report import UsageError

        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    section = _COMMANDS[args.command][0]
    sections = [section] if section else getattr(args, "sections", None)
    main_rank = _shard.is_main()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if main_rank else (lambda msg: None)
    res = generate(data=args.data, root=args.root, model=args.model, weights=args.weights,
                   torchscript=args.torchscript, device=args.device, seed=args.seed, out=args.out, quick=args.quick,
                   sections=sections, epochs=args.epochs, eps=args.eps, limit=args.limit,
                   train_limit=args.train_limit, debug=args.debug,
                   progress=False if args.no_progress else None, log=log)
    if not main_rank:
        return 0
    if args.json:
        from .report import jsonable

        print(json.dumps(jsonable(res.results), indent=1))
    else:
        print()
        print(res.summary())
        if res.html_path:
            print(f"\nreport: {res.html_path}\nnumbers: {res.json_path}")
    failed = [s.key for s in res.sections if s.status == "failed"]
    if failed:
        print(f"robustops {args.command}: section(s) failed: {', '.join(failed)} (details in the report; "
              f"--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .report import UsageError

    try:
        if args.command == "info":
            return _info(args)
        return _run(args)
    except UsageError as e:
        if args.debug:
            raise
        print(f"robustops {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustops {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"robustops {args.command}: error: {type(e).__name__}: {first} (run again with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
