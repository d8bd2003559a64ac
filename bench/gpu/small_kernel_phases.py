# Launch-bound loop diagnostic: n=256 bf16 matmuls, 10 per iteration then a synchronize, for SECONDS.
# Records each iteration's start and end on CLOCK_MONOTONIC (the clock the shim's 50 ms pacing periods are
# aligned to), then prints the iteration rate and, by position within the period (5 ms bins), how many
# iterations started there and their mean duration: a paced run shows whether time is lost at the start of
# a window (wake-up), at its end (the overrun check) or evenly inside it.
# usage: small_kernel_phases.py SECONDS [N]
import sys, time, statistics, torch
secs = float(sys.argv[1]); n = int(sys.argv[2]) if len(sys.argv) > 2 else 256
PERIOD = 50_000_000
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16); b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(20): a @ b
torch.cuda.synchronize()
its = []; t_end = time.monotonic_ns() + int(secs * 1e9)
while True:
    t0 = time.monotonic_ns()
    if t0 >= t_end: break
    for _ in range(10): a @ b
    torch.cuda.synchronize()
    its.append((t0, time.monotonic_ns()))
total = (its[-1][1] - its[0][0]) / 1e9
durs = [e - s for s, e in its]
print(f"iterations/s {len(its) / total:.0f}  median iteration {statistics.median(durs) / 1e3:.1f} us  "
      f"p90 {sorted(durs)[len(durs) * 9 // 10] / 1e3:.1f} us")
bins = {}
for s, e in its:
    bins.setdefault((s % PERIOD) // 5_000_000, []).append(e - s)
print("phase(ms) count median_us mean_us")
for k in sorted(bins):
    v = bins[k]
    print(f"  {k * 5:2d}-{k * 5 + 5:2d} {len(v):7d} {statistics.median(v) / 1e3:8.1f} {statistics.mean(v) / 1e3:8.1f}")
# Iterations that ran long (held or interrupted): how much of the wall time they cover.
long = [d for d in durs if d > 5 * statistics.median(durs)]
print(f"long iterations (>5x median): {len(long)}, {sum(long) / 1e9:.2f} s of {total:.2f} s")
