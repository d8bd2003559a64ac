# Inference-like load: requests arrive at random (exponential gaps, mean GAP_MS), each 8 bf16 matmuls n=4096 (~2 ms of GPU) and
# a synchronize; prints the latency percentiles from arrival to completion over SECONDS. Under a compute slice a
# request that arrives while its window is closed waits for the next one: this shows what the period costs.
# usage: request_latency.py SECONDS [GAP_MS]
import sys, time, random, statistics, torch
secs = float(sys.argv[1]); gap = float(sys.argv[2]) / 1e3 if len(sys.argv) > 2 else 0.05
random.seed(1)
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16); b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
for _ in range(10): a @ b
torch.cuda.synchronize()
lat = []; t_end = time.monotonic() + secs; arrive = time.monotonic()
while arrive < t_end:
    arrive += random.expovariate(1 / gap)
    now = time.monotonic()
    if arrive > now: time.sleep(arrive - now)
    for _ in range(8): a @ b
    torch.cuda.synchronize()
    lat.append(((time.monotonic() - arrive) * 1e3, arrive))
q = statistics.quantiles([l for l, _ in lat], n=100)
print(f"requests {len(lat)}  latency ms: p50 {q[49]:.1f}  p90 {q[89]:.1f}  p99 {q[98]:.1f}  max {max(l for l, _ in lat):.1f}")
# The slowest requests with where they arrived in the pacing period (PERIOD_MS, CLOCK_MONOTONIC-aligned as the shim's).
period = float(__import__("os").environ.get("PERIOD_MS", "500")) / 1e3
print("slowest (latency ms @ arrival phase ms):", " ".join(f"{l:.0f}@{(a % period) * 1e3:.0f}" for l, a in sorted(lat)[-6:]))
