# Raw NVML utilization at a chosen rate, with each sample's phase in the pacing period (CLOCK_MONOTONIC, the
# clock the shim's periods are aligned to): shows how NVML's reported value follows a slice's windows.
# Prints one line per sample "phase_ms util", then per 100 ms phase bin the mean reading.
# usage: nvml_raw.py SECONDS HZ PERIOD_MS [GPU_INDEX]
import sys, time, statistics, pynvml
secs, hz, period = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
idx = int(sys.argv[4]) if len(sys.argv) > 4 else 0
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(idx)
t_wait = time.time()
while pynvml.nvmlDeviceGetUtilizationRates(h).gpu == 0 and time.time() - t_wait < 30:
    time.sleep(0.02)
time.sleep(1.0)
rows = []; t0 = time.monotonic_ns(); step = int(1e9 / hz); nxt = t0
while time.monotonic_ns() - t0 < secs * 1e9:
    now = time.monotonic_ns()
    rows.append(((now // 1_000_000) % period, pynvml.nvmlDeviceGetUtilizationRates(h).gpu))
    nxt += step
    time.sleep(max(0, (nxt - time.monotonic_ns()) / 1e9))
print("samples:", " ".join(f"{p}:{u}" for p, u in rows))
bins = {}
for p, u in rows: bins.setdefault(p * 10 // period, []).append(u)
print("phase bin (tenths of the period): mean util:", " ".join(f"{k}:{statistics.mean(v):.0f}" for k, v in sorted(bins.items())))
print(f"mean {statistics.mean(u for _, u in rows):.1f} over {len(rows)} samples")
