"""The ``fastppo`` command.

fastppo env     versions, devices, the active backend and whether fastppo._C is built
"""

import argparse
import importlib.metadata
import os
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_report() -> str:
    """The text that ``fastppo env`` prints."""
    import torch

    import fastppo
    from fastppo import _backend, packing

    lines = [
        f"fastppo        {fastppo.__version__} ({os.path.dirname(fastppo.__file__)})",
        f"python         {platform.python_version()} ({sys.executable})",
        f"torch          {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"triton         {_version('triton') if _backend.TRITON_AVAILABLE else 'not installed'}"
        f" (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})",
        f"transformers   {_version('transformers')}",
        f"numpy          {_version('numpy')}",
        f"flash-attn     {_version('flash-attn')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(
                f"cuda:{i}         {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs"
            )
    else:
        lines.append("cuda           no CUDA device")
    lines.append(f"FASTPPO_BACKEND {os.environ.get('FASTPPO_BACKEND', 'auto (unset)')}")
    lines.append(f"backend (cpu)  {fastppo.active_backend('cpu')}")
    if torch.cuda.is_available():
        lines.append(f"backend (cuda) {fastppo.active_backend('cuda')}")
    if packing.extension_available():
        lines.append(f"fastppo._C     built ({packing._C.__file__})")
    else:
        lines.append(f"fastppo._C     NOT BUILT: {packing.EXTENSION_ERROR}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastppo", description=__doc__.splitlines()[1].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, devices, the active backend and the extension's status")
    args = parser.parse_args(argv)
    if args.command == "env":
        print(env_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
