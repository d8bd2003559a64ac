# Allocates in steps and waits for a line on stdin between them, so a driver script can compare views.
# usage: python3 steps.py MIB [MIB ...]   (prints "ready <pid> <total MiB>" after each step)
import os, sys, torch
torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
print(f"ready {os.getpid()} 0", flush=True); sys.stdin.readline()
held, total = [], 0
for m in map(int, sys.argv[1:]):
    held.append(torch.empty(m << 20, dtype=torch.uint8, device="cuda")); torch.cuda.synchronize(); total += m
    print(f"ready {os.getpid()} {total}", flush=True); sys.stdin.readline()
