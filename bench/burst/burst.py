#!/usr/bin/env python3
"""Creates N vGPU pods at once against the API server and reports, from a watch, how long each took from its
create request to allocated (`hami.io/bind-phase: success`, written by the node agent after Allocate) and to
Running, plus the failures HAMi's users report for such bursts (BindingFailed events, UnexpectedAdmissionError).
usage: burst.py API_URL CA_FILE TOKEN N OUT_JSON"""
import json, ssl, sys, threading, time, urllib.request

api, ca, token, n, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
H = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

def call(method, path, body=None, timeout=30):
    req = urllib.request.Request(api + path, method=method, headers=H,
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
        return json.loads(r.read())

created, allocated, running = {}, {}, {}
failed = {}
lock = threading.Lock()
rv = call("GET", "/api/v1/namespaces/default/pods")["metadata"]["resourceVersion"]

def watch():
    req = urllib.request.Request(f"{api}/api/v1/namespaces/default/pods?watch=1&resourceVersion={rv}", headers=H)
    with urllib.request.urlopen(req, context=ctx, timeout=600) as r:
        for line in r:
            now = time.monotonic()
            ev = json.loads(line)
            p = ev["object"]; name = p["metadata"]["name"]
            ann = p["metadata"].get("annotations") or {}
            st = p.get("status") or {}
            with lock:
                if ann.get("hami.io/bind-phase") == "success" and name not in allocated:
                    allocated[name] = now
                if st.get("phase") == "Running" and name not in running:
                    running[name] = now
                if st.get("phase") == "Failed" and name not in failed:
                    failed[name] = f"{st.get('reason')}: {st.get('message')}"
                # Done when every pod failed, or runs and is recorded allocated (the agent records it once the
                # kubelet's PodResources confirms the container, which may come after the container started).
                if sum(1 for k in running if k in allocated) + len(failed) >= n:
                    return

w = threading.Thread(target=watch, daemon=True); w.start()
time.sleep(0.5)

def pod(i):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"burst-{i:03d}"},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "app", "image": "bench/host-process",
                     "command": ["sleep", "600"],
                     "resources": {"limits": {"nvidia.com/gpu": 1, "nvidia.com/gpumem": 1000}}}]}}

def create(i):
    t = time.monotonic()
    call("POST", "/api/v1/namespaces/default/pods", pod(i))
    with lock:
        created[f"burst-{i:03d}"] = t

threads = [threading.Thread(target=create, args=(i,)) for i in range(n)]
t0 = time.monotonic()
for t in threads: t.start()
for t in threads: t.join()
w.join(timeout=300)
events = call("GET", "/api/v1/namespaces/default/events")["items"]
binding_failed = sum(1 for e in events if e.get("reason") == "BindingFailed")
unexpected = sum(1 for v in failed.values() if "UnexpectedAdmissionError" in v)

def pct(v, q):
    v = sorted(v); return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")

to_alloc = [allocated[k] - created[k] for k in allocated if k in created]
to_run = [running[k] - created[k] for k in running if k in created]
res = {"pods": n, "allocated": len(to_alloc), "running": len(to_run), "failed": len(failed),
       "binding_failed_events": binding_failed, "unexpected_admission_errors": unexpected,
       "create_to_allocated_s": {"p50": pct(to_alloc, .5), "p99": pct(to_alloc, .99), "max": max(to_alloc, default=float("nan"))},
       "create_to_running_s": {"p50": pct(to_run, .5), "p99": pct(to_run, .99), "max": max(to_run, default=float("nan"))},
       "all_created_in_s": max(created.values()) - t0, "failures": dict(list(failed.items())[:5])}
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res, indent=1))
