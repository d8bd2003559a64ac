# Two matmul_loop.py outputs that ran side by side: each one's mean TFLOP/s over the 1 s windows that lie wholly
# inside the span both were running (start-up skew excluded), as a ratio to BASE.
# usage: overlap.py A.txt B.txt BASE_TFLOPS
import sys, re
def windows(path):
    return [(float(a), float(b), float(t)) for t, a, b in
            re.findall(r"^window +\S+ +([\d.]+) TFLOP/s from ([\d.]+) to ([\d.]+)", open(path).read(), re.M)]
a, b, base = windows(sys.argv[1]), windows(sys.argv[2]), float(sys.argv[3])
lo = max(a[0][0], b[0][0]); hi = min(a[-1][1], b[-1][1])
def mean(ws):
    inside = [t for s, e, t in ws if s >= lo and e <= hi]
    return sum(inside) / len(inside) if inside else float("nan"), len(inside)
(ma, na), (mb, nb) = mean(a), mean(b)
print(f"{ma / base:.3f} and {mb / base:.3f} over the {na} and {nb} whole seconds both ran")
