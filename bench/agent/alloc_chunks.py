# Allocates TOTAL MiB in CHUNK MiB tensors, one every 0.2 s, printing a timestamp after each; then holds.
# usage: python3 alloc_chunks.py TOTAL CHUNK [HOLD_S]
import sys, time, torch
total, chunk = int(sys.argv[1]), int(sys.argv[2])
hold = float(sys.argv[3]) if len(sys.argv) > 3 else 5
torch.cuda.init(); torch.zeros(1, device="cuda")
held = []
for i in range(total // chunk):
    held.append(torch.empty(chunk << 20, dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    print(f"{time.time():.3f} pid {__import__('os').getpid()} allocated {(i + 1) * chunk} MiB", flush=True)
    time.sleep(0.2)
print(f"{time.time():.3f} survived holding {total} MiB", flush=True)
time.sleep(hold)
