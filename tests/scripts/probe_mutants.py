"""Named mutants of the per-example probe, each run against the tests meant to kill it.

    python tests/scripts/probe_mutants.py            # all mutants (a few minutes on 2 cores)
    python tests/scripts/probe_mutants.py M3 M7      # some

Each mutant is one textual change in a copy of ``src/``; the listed tests run against the copy
(``PYTHONPATH``), and a mutant survives if they all pass. Exit status 1 if any survives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = "src/adabatch/noise/per_example/"
PE = "tests/noise/test_per_example.py"
ZOO = "tests/noise/test_zoo.py"

# name: (file, old, new, tests)
MUTANTS = {
    "M1 batch_first hint ignored": (
        "layout.py", "        if self.hint is not None:\n", "        if False:\n",
        [f"{PE}::test_sequence_first_transformer_layer_with_T_equal_B_is_exact"]),
    "M2 ambiguous layout guessed as dim 0": (
        "layout.py", "        known = self.memo.get(self.index)\n",
        "        known = dims[0]\n",
        [f"{PE}::test_sequence_first_model_with_T_equal_B_is_refused_not_guessed"]),
    "M3 coupling not applied to the parameters": (
        "probe.py", "            self._runtime_reasons.setdefault(pid, self._coupled)\n",
        "            pass\n", [ZOO + "::test_zoo"]),
    "M4 train-mode switch after attach not seen": (
        "probe.py", "                    self._set_coupled(name, module)\n",
        "                    pass\n",
        [f"{ZOO}::test_batchnorm_switched_to_train_after_attach_is_coupled_at_its_forward"]),
    "M5 eval BatchNorm ignores the running mean": (
        "norm.py", "            xs.append(((x - mean) * inv)",
        "            xs.append(((x - 0 * mean) * inv)",
        [ZOO + "::test_zoo"]),
    "M6 attention pieces never split across calls": (
        "attention.py", "    if any(s2 < s1 + r1 for", "    if False and any(s2 < s1 + r1 for",
        [f"{PE}::test_multihead_attention_called_twice_and_cross_attention"]),
    "M7 out-projection rows read batch-major": (
        "attention.py", "x.view(-1, B, x.shape[-1]), g.view(-1, B, g.shape[-1])",
        "x.view(B, -1, x.shape[-1]).transpose(0, 1), g.view(B, -1, g.shape[-1]).transpose(0, 1)",
        [f"{PE}::test_multihead_attention"]),
    "M8 bypassed hooks not detected": (
        "probe.py", "        if unit.last_pass != self._passes and not unit.broken:",
        "        if False:", [f"{ZOO}::test_compiling_after_attach_is_detected_not_silent"]),
    "M9 compiled modules not refused": (
        "probe.py", "    return (optimized is not None and isinstance(m, optimized)) or (",
        "    return False and (", [ZOO + "::test_zoo"]),
    "M10 output-gradients not moved to batch-first": (
        "probe.py", "            if c.out_bdim:  # sequence-first", "            if False:  #",
        [f"{PE}::test_sequence_first_model_with_T_unequal_B_is_exact_when_told_the_batch_size"]),
    "M11 bias_k of the second call dropped": (
        "attention.py", "            total = sum(gs)", "            total = gs[0]",
        [f"{PE}::test_multihead_attention_called_twice_and_cross_attention"]),
    "M12 resolved layout not remembered": (
        "layout.py", "        if known in dims:\n", "        if False:\n",
        [f"{PE}::test_layout_learned_on_an_unambiguous_pass_resolves_a_later_T_equal_B"]),
    "M13 tap kept after the forward": (
        "attention.py", "        F.linear = tap.orig\n", "        pass\n",
        [f"{PE}::test_multihead_attention_tap_is_removed_even_when_the_forward_raises"]),
}


def run(name: str) -> bool:
    """True if the mutant is killed."""
    file, old, new, tests = MUTANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "src", Path(tmp) / "src")
        path = Path(tmp) / PKG / file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{name}: the text to mutate is not found once in {file}")
        path.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": f"{tmp}/src"}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        return proc.returncode != 0


def main(argv: list[str]) -> int:
    names = [n for n in MUTANTS if not argv or n.split()[0] in argv]
    survivors = []
    for name in names:
        killed = run(name)
        print(f"{'killed  ' if killed else 'SURVIVED'} {name}", flush=True)
        if not killed:
            survivors.append(name)
    print(f"{len(names) - len(survivors)}/{len(names)} killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
