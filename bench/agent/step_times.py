# A small training step (as bench/gpu/train_step.py) run for SECONDS; prints "<unix time> <ms per step>" for each
# block of 20 steps, so a driver can switch the agent on and off under one running process and compare blocks.
import sys, time, torch, torch.nn as nn
secs = float(sys.argv[1]) if len(sys.argv) > 1 else 60
d = 512
torch.manual_seed(0)
model = nn.Sequential(*[nn.TransformerEncoderLayer(d, 8, 4 * d, batch_first=True) for _ in range(4)], nn.Linear(d, 1000)).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(8, 256, d, device="cuda"); y = torch.randint(0, 1000, (8, 256), device="cuda")
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x).float().reshape(-1, 1000), y.reshape(-1))
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
for _ in range(30): step()
torch.cuda.synchronize(); print("ready", flush=True)
t_end = time.time() + secs
while time.time() < t_end:
    t = time.perf_counter()
    for _ in range(20): step()
    torch.cuda.synchronize()
    print(f"{time.time():.3f} {(time.perf_counter() - t) * 1000 / 20:.3f}", flush=True)
