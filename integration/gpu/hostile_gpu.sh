#!/bin/bash
# Issue 16 on the real GPU: a tenant that writes anything it can reach in the card directory cannot slow a
# neighbour whose compute windows the agent placed in its (read-only) limits file. Plain bash + python3; no cargo.
#
#   (a) one honest 30% force slice alone, agent windows            -> its throughput ratio to unlimited
#   (b) a tenant holding all 64 card entries with live locks and fake share-99 claims, beside two honest slices
#       (30% and 40% force) whose limits files give them the agent's first-fit windows -> each one's ratio
#   (b') the same two slices with no windows (the card-file placement, as before issue 16): for the record only
#   (c) a 30% force slice with agent windows while a tenant cuts the card file short and writes 2^64-1 into the
#       debt words of every entry                                 -> its ratio; it must not crash or hang
# A row passes when the ratio is within +-5 points of the share (and, for (c), the slice exits cleanly in time).
# Prints a table; exits 1 if any row fails, 2 if it could not run.
#
# Workload: bench/gpu/matmul_loop.py (bf16 n=4096 matmul loop, TFLOP/s), as integration/gpu/pacing.sh measured;
# unlimited runs at the start and the end, ratios against their mean.
#
# The shim: $SHIM, else libvgpu.so from target/gpu-bundle/bundle.tar.xz (integration/gpu/make_bundle.sh),
# else target/release/libvgpu.so.
# usage (device tool): build here `cargo build --release -p vgpu-shim`, then run with carry
#   ["target/release/libvgpu.so"] (or make_bundle.sh and carry ["target/gpu-bundle"]):
#   bash integration/gpu/hostile_gpu.sh "$OUT" 20      (OUTDIR, SECONDS per case; ~4 min at 20 s)
# Dry run against the simulated GPU (no torch): SIM_DIR=$(target/debug/sim-dir) SHIM=target/debug/libvgpu.so \
#   bash integration/gpu/hostile_gpu.sh /tmp/hostile-dry 4
set -u
cd "$(dirname "$0")/../.."
R=$PWD; OUT=${1:-/tmp/hostile-gpu}; D=${2:-20}; PERIOD_MS=${PERIOD_MS:-500}
mkdir -p "$OUT"; T=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
LOG=$OUT/hostile-gpu.log; : > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
die() { say "cannot run: $*"; exit 2; }

S=${SHIM:-}
if [ -z "$S" ] && [ -f target/gpu-bundle/bundle.tar.xz ]; then
  tar -C "$T" -xJf target/gpu-bundle/bundle.tar.xz ./libvgpu.so 2>/dev/null || tar -C "$T" -xJf target/gpu-bundle/bundle.tar.xz libvgpu.so
  S=$T/libvgpu.so
fi
[ -z "$S" ] && S=$R/target/release/libvgpu.so
[ -f "$S" ] || die "no libvgpu.so (set SHIM, or carry target/gpu-bundle or target/release/libvgpu.so)"
S=$(cd "$(dirname "$S")" && pwd)/$(basename "$S")
# Off Kubernetes the shim takes VGPU_LIMITS_FILE; the mounted path, if anything is there, would win over it.
[ -e /usr/local/vgpu/limits ] && die "/usr/local/vgpu/limits exists on this machine: the limits files written here would be ignored"

CARDS=$T/cards; mkdir -p "$CARDS"; chmod 1777 "$CARDS"
if [ -n "${SIM_DIR:-}" ]; then
  # The simulated card: kernels of 500 us, a synchronize every 4; "overall busy" is the throughput.
  export LD_LIBRARY_PATH=$SIM_DIR VGPU_SIM_STATE=$T/simstate VGPU_SIM_DEVICES=1
  UUID=GPU-5a1c0000-0000-4000-8000-000000000000
  WORK=("$SIM_DIR/cuda_launch" -u 500 -k 4 -s "$D")
  thr() { grep -o 'overall busy [0-9.]*' | awk '{print $3}'; }
else
  export LD_LIBRARY_PATH=/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  UUID=$(nvidia-smi --query-gpu=uuid --format=csv,noheader -i 0 2>/dev/null | tr -d ' ')
  [[ $UUID == GPU-* ]] || die "no GPU UUID from nvidia-smi ($UUID)"
  WORK=(python3 "$R/bench/gpu/matmul_loop.py" "$D" 4096)
  thr() { grep -o 'overall [0-9.]*' | awk '{print $2}'; }
fi
PUS=$((PERIOD_MS * 1000))

# limits NAME SHARE [WINDOWS]: the limits file the agent writes for a container (ready), with its windows.
limits() {
  local f=$T/$1.limits
  {
    echo "# written by hostile_gpu.sh as vgpu-agent writes it"
    echo "NVIDIA_VISIBLE_DEVICES=$UUID"
    echo "CUDA_DEVICE_MEMORY_LIMIT_0=20000m"
    echo "CUDA_DEVICE_SM_LIMIT=$2"
    echo "GPU_CORE_UTILIZATION_POLICY=force"
    echo "CUDA_DEVICE_MEMORY_SHARED_CACHE=$T/$1.cache"
    echo "VGPU_CARD_DIR=$CARDS"
    echo "VGPU_PACING_PERIOD_MS=$PERIOD_MS"
    [ -n "${3:-}" ] && echo "VGPU_CORE_WINDOWS_0=$3"
    echo "VGPU_LIMITS_STATE=ready"
  } > "$f"
  echo "$f"
}
# slice NAME SHARE [WINDOWS]: the workload in that container, under the shim; output in $T/NAME.out, rc in .rc
slice() {
  local f; f=$(limits "$1" "$2" "${3:-}")
  ( env -u VGPU_LIMITS_FILE -u CUDA_DEVICE_SM_LIMIT -u GPU_CORE_UTILIZATION_POLICY \
      VGPU_LIMITS_FILE="$f" LD_PRELOAD="$S" VGPU_LOG=info timeout $((D + 90)) "${WORK[@]}" \
      > "$T/$1.out" 2>&1; echo $? > "$T/$1.rc" )
}
unlimited() { timeout $((D + 90)) "${WORK[@]}" 2>&1 | thr; }
ratio() { awk -v a="${1:-0}" -v b="$2" 'BEGIN{ if (b>0 && a!="") printf "%.3f", a/b; else print "n/a" }'; }
ROWS=(); FAIL=0
row() {  # row LABEL RATIO WANT [EXTRA-CONDITION-OK 0/1] [NOTE]
  local ok=${4:-1} v
  v=$(awk -v r="$2" -v w="$3" 'BEGIN{ if (r=="n/a") {print "FAIL"; exit} d=r-w; if (d<0) d=-d; print (d<=0.05?"PASS":"FAIL") }')
  [ "$ok" = 1 ] || v=FAIL
  [ "$v" = PASS ] || FAIL=1
  ROWS+=("$(printf '%-62s %7s %6s  %s  %s' "$1" "$2" "$3" "$v" "${5:-}")")
}
info() { ROWS+=("$(printf '%-62s %7s %6s  %s  %s' "$1" "$2" "$3" "INFO" "${4:-}")"); }
w30="$PERIOD_MS:0+$((PUS * 30 / 100))"
w40="$PERIOD_MS:$((PUS * 30 / 100))+$((PUS * 40 / 100))"

say "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(hostname)  shim: $S"
[ -z "${SIM_DIR:-}" ] && say "$(nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader)"
say "card $UUID; ${D} s per case; ${PERIOD_MS} ms periods; windows 30% $w30, 40% $w40"
u1=$(unlimited); say "unlimited (start): $u1"

# (a)
slice a30 30 "$w30"; ra=$(thr < "$T/a30.out")
say "(a) 30% alone, agent windows: $ra"

# (b) the tenant takes the whole table first, then the two honest slices start side by side.
python3 "$R/integration/gpu/hostile_card.py" hold "$CARDS" "$UUID" $((2 * D + 200)) > "$T/tenant.out" 2>&1 & TEN=$!
for _ in $(seq 100); do grep -q '^held' "$T/tenant.out" && break; sleep 0.1; done
held=$(grep -o '^held [0-9]*' "$T/tenant.out" | awk '{print $2}'); held=${held:-0}; say "tenant: $(cat "$T/tenant.out")"
slice b30 30 "$w30" & P1=$!; slice b40 40 "$w40" & P2=$!; wait $P1 $P2
rb30=$(thr < "$T/b30.out"); rb40=$(thr < "$T/b40.out")
attack=0; grep -q "every entry of the card file is held" "$T/b30.out" && grep -q "every entry of the card file is held" "$T/b40.out" && attack=1
placed=0; grep -q "windows the node's agent placed" "$T/b30.out" && grep -q "windows the node's agent placed" "$T/b40.out" && placed=1
say "card files: $(cd "$CARDS" && ls)"
say "(b) with the tenant holding $held entries: 30% $rb30, 40% $rb40 (found no entry: $attack; agent windows used: $placed)"
# (b') the same without windows, the tenant still holding the table.
slice o30 30 & P1=$!; slice o40 40 & P2=$!; wait $P1 $P2
ro30=$(thr < "$T/o30.out"); ro40=$(thr < "$T/o40.out")
say "(b') without windows (card-file placement): 30% $ro30, 40% $ro40"
kill $TEN 2>/dev/null; wait $TEN 2>/dev/null

# (c) a slice with agent windows; once it runs, the card is cut short and scribbled for most of its run.
rm -f "$CARDS"/*.card
slice c30 30 "$w30" & SL=$!
for _ in $(seq 300); do ls "$CARDS"/*.card >/dev/null 2>&1 && break; sleep 0.1; done
python3 "$R/integration/gpu/hostile_card.py" cut "$CARDS" $((D * 3 / 4)) > "$T/cut.out" 2>&1
wait $SL; rc=$(cat "$T/c30.rc" 2>/dev/null || echo none); rc30=$(thr < "$T/c30.out")
say "(c) card cut and scribbled ($(cat "$T/cut.out")): 30% $rc30, exit $rc"

u2=$(unlimited); say "unlimited (end): $u2"
base=$(awk -v a="${u1:-0}" -v b="${u2:-0}" 'BEGIN{ if (a>0 && b>0) print (a+b)/2; else if (a>0) print a; else print b }')
[ "$(awk -v b="$base" 'BEGIN{print (b>0)}')" = 1 ] || die "no unlimited throughput measured"

row "(a) 30% force alone, agent windows" "$(ratio "$ra" "$base")" 0.30
row "(b) 30% force, tenant holds all 64 entries, + 40% neighbour" "$(ratio "$rb30" "$base")" 0.30 \
  $(( held == 64 && attack == 1 && placed == 1 )) "tenant held $held; no entry found: $attack"
row "(b) 40% force, same run" "$(ratio "$rb40" "$base")" 0.40 $(( held == 64 && attack == 1 && placed == 1 ))
info "(b') 30% force, same tenant, no windows (old placement)" "$(ratio "$ro30" "$base")" 0.30 "overlap expected"
info "(b') 40% force, same run" "$(ratio "$ro40" "$base")" 0.40 "overlap expected"
row "(c) 30% force, card cut + 2^64-1 words, exits cleanly" "$(ratio "$rc30" "$base")" 0.30 \
  $([ "$rc" = 0 ] && grep -q overall "$T/c30.out" && echo 1 || echo 0) "exit $rc"
{
  echo
  printf '%-62s %7s %6s  %s\n' "row (ratio to unlimited $base)" ratio want result
  for r in "${ROWS[@]}"; do echo "$r"; done
} | tee -a "$LOG"
for f in a30 b30 b40 o30 o40 c30; do { echo "--- $f (rc $(cat "$T/$f.rc" 2>/dev/null))"; tail -n 15 "$T/$f.out"; } >> "$LOG"; done
cp "$T"/*.limits "$OUT"/ 2>/dev/null
[ $FAIL = 0 ] && say "all rows PASS" || say "some rows FAIL"
exit $FAIL
