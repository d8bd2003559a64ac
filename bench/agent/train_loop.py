# A neighbour that keeps PyTorch busy for SECONDS (matmul + small training step), printing a heartbeat.
# usage: python3 train_loop.py SECONDS TAG
import sys, time, torch, torch.nn as nn
secs, tag = float(sys.argv[1]), sys.argv[2]
m = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).cuda()
opt = torch.optim.AdamW(m.parameters()); x = torch.randn(256, 1024, device="cuda")
t0, n, last = time.time(), 0, 0
while time.time() - t0 < secs:
    loss = m(x).square().mean(); opt.zero_grad(); loss.backward(); opt.step(); n += 1
    if time.time() - last > 2:
        torch.cuda.synchronize(); last = time.time(); print(f"{last:.3f} {tag} alive steps {n}", flush=True)
print(f"{time.time():.3f} {tag} done steps {n}", flush=True)
