"""Compiled CPU decode steps with and without inductor's per-call size asserts.

    python benchmarks/step_asserts.py [--config embedded|mid] [--windows 64 512] [--pairs 2]

inductor's generated wrapper asserts the size and strides of every input of a compiled
function on each call (``size_asserts``). The runner compiles its CPU steps without them and
checks the layouts of everything its steps read in one call instead
(``graphdelta/runtime/layouts.py``). This compiles the batch-1 decode step of each attention
window both ways, "asserts" (``size_asserts`` on while that runner compiles) and "no_asserts"
(the runtime as it is), checks that their logits agree, and times their replays in turns
(``common.compare_step_variants``: the method, the table's columns). A replay is inductor's
function alone: the runner's layout check (about 11 us for the tiny model) is not in either
figure.
Writes step_asserts_<config>.{json,md,png} to the results folder (``common.results_dir()``).
"""
from __future__ import annotations

import contextlib
from unittest import mock

from common import compare_step_variants, parse_window_step_arguments


def main(argv=None) -> None:
    args, model = parse_window_step_arguments(__doc__, argv)

    from graphdelta.runtime import runner

    options = runner._cpu_step_options

    def asserts():  # the options the runtime had before, with inductor's size asserts
        return mock.patch.object(runner, "_cpu_step_options", lambda: {**options(), "size_asserts": True})

    variants = {"asserts": asserts, "no_asserts": contextlib.nullcontext}
    print(compare_step_variants(args, model, args.windows, variants, "step_asserts.py",
                                "compiled CPU decode step, batch 1", argv=argv))


if __name__ == "__main__":
    main()
