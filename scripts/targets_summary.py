"""Issue 5's speed targets from a `scripts/gpu_check.sh` report (gpu_report.txt): the CUDA-graph
decode steps of the Llama-3-8B shape (the default settings only: not the forced arenas, the
long cache, one rank alone or the opt-in variants of the tp 2 step) and HF transformers' timings
of the same report. Prints one line a target, or why it cannot be computed from this report, then
(context, not targets) the PyTorch tensor-parallel peer's figures beside tessera's where the
report has them (scripts/gpu_targets.sh runs it).

    python3 scripts/targets_summary.py gpu_report.txt
    python3 scripts/targets_summary.py --self-test    (CI: a made-up report, known answers)
"""
import re
import statistics
import sys

ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s*$")
HF = re.compile(r"^hf batch\s+(\d+):\s+([\d.]+) ms/step\s+([\d.]+) tok/s")
# scripts/bench_torch_tp_decode.py: "torch|compiled[-symm] tp T batch B: MS ms/step TOK tok/s, ..."
PEER = re.compile(r"^((?:torch|compiled)(?:-symm)?) tp (\d+) batch\s+(\d+):\s+([\d.]+) ms/step\s+([\d.]+) tok/s")


def counted(header):
    """Whether a `== tessera bench decode` section holds default CUDA-graph steps of the 8B shape."""
    if "Llama-3-8B shape" not in header or "CUDA graphs" not in header:
        return False
    if any(s in header for s in ("ARENA", "position cache", "one rank")):
        return False
    # The tp 2 step's variants: "..., CUDA graphs, <variant> (round n)"; only the default counts.
    tail = header.split("CUDA graphs", 1)[1].strip(", ")
    return tail == "" or tail.startswith(("default", "round"))


def parse(lines):
    steps = {}  # (tp, batch) -> [(ms, tok/s, % roofline)]
    hf = {}  # batch -> [tok/s]
    peer = {}  # (kind, tp, batch) -> [ms]
    section = None
    for line in lines:
        m = PEER.match(line)
        if m:
            peer.setdefault((m.group(1), int(m.group(2)), int(m.group(3))), []).append(float(m.group(4)))
            continue
        if line.startswith("=="):
            section = line if line.startswith("== tessera bench decode") else None
            continue
        m = HF.match(line)
        if m:
            hf.setdefault(int(m.group(1)), []).append(float(m.group(3)))
            continue
        m = ROW.match(line)
        if m and section and counted(section):
            tp, batch = int(m.group(1)), int(m.group(2))
            steps.setdefault((tp, batch), []).append(
                (float(m.group(3)), float(m.group(4)), float(m.group(5))))
    return steps, hf, peer


def span(values, fmt):
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def summary(lines):
    steps, hf, peer = parse(lines)
    out = []
    one = steps.get((1, 1))
    if one:
        pct = [p for _, _, p in one]
        met = "met" if max(pct) >= 85 else "not met"
        out.append(f"target batch 1, one GPU: {span([ms for ms, _, _ in one], '{:.2f}')} ms, "
                   f"{span(pct, '{:.1f}')}% of the roofline (85% wanted): {met}")
    else:
        out.append("target batch 1, one GPU: no tp 1 batch 1 graph step in this report")
    two = steps.get((2, 1))
    if one and two:
        r = statistics.median(ms for ms, _, _ in one) / statistics.median(ms for ms, _, _ in two)
        met = "met" if r >= 1.75 else "not met"
        out.append(f"target batch 1, tp 2 / tp 1: {r:.2f}x of the medians (tp 2 "
                   f"{span([ms for ms, _, _ in two], '{:.2f}')} ms; 1.75x wanted): {met}")
    else:
        out.append("target batch 1, tp 2 / tp 1: needs tp 1 and tp 2 batch 1 graph steps (two GPUs)")
    # Batch 64 at the tp whose median is highest (tp 2 where it ran).
    b64 = {tp: [tok for _, tok, _ in steps[(tp, 64)]] for tp in (1, 2) if (tp, 64) in steps}
    if b64 and hf.get(32):
        tp = max(b64, key=lambda t: statistics.median(b64[t]))
        best_hf = max(hf[32])
        r = statistics.median(b64[tp]) / best_hf
        met = "met" if r >= 20 else "not met"
        out.append(f"target batch 64 / HF batch 32: {r:.1f}x (tp {tp} batch 64 "
                   f"{span(b64[tp], '{:.0f}')} tok/s, median; HF's best {best_hf:.1f} tok/s; "
                   f"20x wanted): {met}")
    else:
        out.append("target batch 64 / HF batch 32: needs batch 64 graph steps and HF's batch 32 "
                   "in the same report")
    # Context, not targets: the PyTorch tensor-parallel peer of the same report.
    # tp 1 has no all-reduce, so its run with either all-reduce is the reference of both.
    names = {"compiled": "PyTorch compiled", "torch": "PyTorch eager"}
    for base in ("compiled", "torch"):
        p1 = peer.get((base, 1, 1), []) + peer.get((base + "-symm", 1, 1), [])
        for kind, how in ((base + "-symm", "symmetric-memory all-reduce"), (base, "NCCL")):
            p2 = peer.get((kind, 2, 1))
            if p1 and p2 and one and two:
                ours = statistics.median(ms for ms, _, _ in one) / statistics.median(ms for ms, _, _ in two)
                out.append(f"peer batch 1, tp 2 / tp 1: {names[base]}, {how} {min(p1) / min(p2):.2f}x "
                           f"({min(p1):.2f} / {min(p2):.2f} ms), tessera {ours:.2f}x")
            p64 = peer.get((kind, 2, 64))
            if p64 and (2, 64) in steps:
                ms = statistics.median(ms for ms, _, _ in steps[(2, 64)])
                out.append(f"peer batch 64, tp 2: {names[base]}, {how} {min(p64):.2f} ms a step, "
                           f"tessera {ms:.2f} ({min(p64) / ms:.2f}x faster)")
    return out


SAMPLE = """== tessera bench decode, Llama-3-8B shape, CUDA graphs
  1      1       4.00      250.0        16.07            262.0        95.0
  1     64       5.00    12800.0        16.48          16400.0        77.0
== tessera bench decode, Llama-3-8B shape, CUDA graphs, TESSERA_GRAPH_ARENA=1
  1      1       1.00     1000.0        16.07            262.0        99.9
== tessera bench decode, Llama-3-8B shape, tp 2, CUDA graphs, 0 (round 1)
  2      1       1.00     1000.0         8.03            525.0        99.0
== tessera bench decode, Llama-3-8B shape, tp 2, CUDA graphs, default (round 1)
  2      1       2.00      500.0         8.03            525.0        70.0
  2     64       3.20    20000.0         8.24          32800.0        50.0
== tessera bench decode, one rank of tp 2 alone
1/2      1       1.50      666.0         8.03            526.0        90.0
== HF transformers baseline
hf batch  32:    30.00 ms/step     1000.0 tok/s (best of 30.00 ms)
hf batch  32:    32.00 ms/step      900.0 tok/s
compiled tp 1 batch   1:   4.800 ms/step      208.3 tok/s, roofline 3.7 ms
compiled-symm tp 2 batch   1:   4.000 ms/step      250.0 tok/s, roofline 1.8 ms
compiled-symm tp 2 batch  64:   4.800 ms/step    13333.3 tok/s, roofline 1.9 ms
torch tp 2 batch   1:   6.000 ms/step      166.6 tok/s, roofline 1.8 ms
"""


def self_test():
    got = summary(SAMPLE.splitlines())
    assert got[0].startswith("target batch 1, one GPU: 4.00 ms, 95.0%") and got[0].endswith(": met"), got[0]
    assert got[1].startswith("target batch 1, tp 2 / tp 1: 2.00x") and got[1].endswith(": met"), got[1]
    assert got[2].startswith("target batch 64 / HF batch 32: 20.0x (tp 2") and got[2].endswith(": met"), got[2]
    assert got[3] == ("peer batch 1, tp 2 / tp 1: PyTorch compiled, symmetric-memory all-reduce 1.20x "
                      "(4.80 / 4.00 ms), tessera 2.00x"), got[3]
    assert got[4] == ("peer batch 64, tp 2: PyTorch compiled, symmetric-memory all-reduce 4.80 ms a step, "
                      "tessera 3.20 (1.50x faster)"), got[4]
    # The eager peer's tp 2 without its tp 1 in the report: no ratio.
    assert len(got) == 5, got
    empty = summary([])
    assert all("needs" in line or "no tp 1" in line for line in empty), empty
    print("targets_summary.py: self-test passed")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        sys.exit(0)
    if len(sys.argv) != 2:
        sys.exit("usage: targets_summary.py REPORT | --self-test")
    try:
        with open(sys.argv[1], encoding="utf-8") as f:
            text = f.read().splitlines()
    except OSError as e:
        sys.exit(f"targets_summary.py: {e}")
    print("\n".join(summary(text)))
