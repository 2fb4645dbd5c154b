"""Print constraints files merged, later files winning: `python merge_constraints.py base.txt over.txt ...`.

The eval image installs lmms-eval under constraints.txt and images/constraints-eval.txt together; where
both pin a package (antlr4-python3-runtime: the dev venv's 4.13.2, lmms-eval's latex2sympy2 needs
4.7.2), images/constraints-eval.txt's pin is the eval image's. `pip check` in the build still fails if
the result does not agree.
"""

import re
import sys

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def key(line: str) -> str | None:
    match = NAME.match(line)
    return re.sub(r"[-_.]+", "-", match[1]).lower() if match else None


def merge(paths: list[str]) -> list[str]:
    pins: dict[str, str] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if name := key(line):
                    pins[name] = line
    return [pins[name] for name in sorted(pins)]


if __name__ == "__main__":
    print("\n".join(merge(sys.argv[1:])))
