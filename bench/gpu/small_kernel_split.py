# Launch-bound loop, timed in parts: n=256 bf16 matmuls, 10 per iteration then a synchronize, for SECONDS.
# For each iteration: the time to enqueue the 10 matmuls (CPU: PyTorch + driver launch path), the time the
# synchronize then waited, and the GPU time between two events around the matmuls. Iterations held by pacing
# (longer than 5x the median) are reported apart, so the "in-window" figures compare with an unlimited run.
# usage: small_kernel_split.py SECONDS [N]
import sys, time, statistics, torch
secs = float(sys.argv[1]); n = int(sys.argv[2]) if len(sys.argv) > 2 else 256
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16); b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(20): a @ b
torch.cuda.synchronize()
e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
rows = []; t_end = time.monotonic_ns() + int(secs * 1e9)
while True:
    t0 = time.monotonic_ns()
    if t0 >= t_end: break
    e0.record()
    for _ in range(10): a @ b
    e1.record()
    t1 = time.monotonic_ns()
    torch.cuda.synchronize()
    t2 = time.monotonic_ns()
    rows.append((t0, t1 - t0, t2 - t1, e0.elapsed_time(e1) * 1e6))
total = (time.monotonic_ns() - rows[0][0]) / 1e9
med = statistics.median(r[1] + r[2] for r in rows)
norm = [r for r in rows if r[1] + r[2] <= 5 * med]
held = sum(r[1] + r[2] for r in rows if r[1] + r[2] > 5 * med) / 1e9
m = lambda i: statistics.mean(r[i] for r in norm) / 1e3
print(f"iterations/s {len(rows) / total:.0f}  iterations {len(rows)}  held {held:.2f} s of {total:.2f} s  "
      f"running {len(norm) / max(total - held, 1e-9):.0f} iterations/s")
print(f"  not held: mean enqueue {m(1):.1f} us  sync {m(2):.1f} us  iteration {m(1) + m(2):.1f} us  "
      f"gpu (events) {m(3):.1f} us  median iteration {statistics.median(r[1] + r[2] for r in norm) / 1e3:.1f} us")
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
print(f"  process CPU time {ru.ru_utime + ru.ru_stime:.2f} s (all threads, start-up included)")
