# Allocate up to MiB in 256 MiB tensors (stopping at the first refusal), report, then hold for SECONDS.
# usage: hold.py MIB SECONDS NAME
import sys, time, torch
target, secs, name = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
chunks, got = [], 0
try:
    while got < target:
        step = min(256, target - got)
        chunks.append(torch.empty(step << 20, dtype=torch.uint8, device="cuda"))
        got += step
except RuntimeError as e:
    print(f"{name}: refused after {got} MiB: {str(e).split('.')[0]}", flush=True)
free, total = torch.cuda.mem_get_info()
print(f"{name}: holding {got} MiB; mem_get_info free={free >> 20} MiB total={total >> 20} MiB", flush=True)
time.sleep(secs)
print(f"{name}: done", flush=True)
