"""`flexicache` command line: demo, profile, eval."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("flexicache_hf.demo", "pass-key retrieval on a real model: dense vs FlexiCache"),
    "profile": ("flexicache_hf.profile_cli", "record head stability and write a profile JSON"),
    "eval": ("flexicache_hf.eval_cli", "accuracy retention: FlexiCache vs dense and peer methods"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: flexicache {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
