# Samples NVML at 10 Hz: waits until the GPU is first busy (so a workload's start-up is not counted), then for
# SECONDS records GPU utilization, SM clock and power. Prints the 1 s window means, the overall mean, and the
# spread of the windows. usage: nvml_sampler.py SECONDS [GPU_INDEX]
import sys, time, statistics, pynvml
secs = float(sys.argv[1]); idx = int(sys.argv[2]) if len(sys.argv) > 2 else 0
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(idx)
t_wait = time.time()
while pynvml.nvmlDeviceGetUtilizationRates(h).gpu == 0 and time.time() - t_wait < 30:
    time.sleep(0.02)
time.sleep(1.0)  # skip the first second: the workload's warm-up
samples = []; t0 = time.time()
while time.time() - t0 < secs:
    u = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
    clk = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
    pw = pynvml.nvmlDeviceGetPowerUsage(h) / 1000
    samples.append((time.time() - t0, u, clk, pw)); time.sleep(0.1)
wins = {}
for t, u, _, _ in samples: wins.setdefault(int(t), []).append(u)
means = [statistics.mean(v) for k, v in sorted(wins.items()) if len(v) >= 8]
print("1s means:", " ".join(f"{m:.0f}" for m in means))
print(f"util mean={statistics.mean(s[1] for s in samples):.1f} windows min={min(means):.0f} max={max(means):.0f} "
      f"sm_clock mean={statistics.mean(s[2] for s in samples):.0f} MHz power mean={statistics.mean(s[3] for s in samples):.0f} W")
