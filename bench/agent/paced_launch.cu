// Launches empty kernels at a fixed rate (default 10000/s) for SECONDS, to load the agent's launch probes.
// usage: paced_launch [RATE] [SECONDS]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
__global__ void empty() {}
int main(int argc, char **argv) {
  int rate = argc > 1 ? atoi(argv[1]) : 10000, secs = argc > 2 ? atoi(argv[2]) : 20;
  auto t0 = std::chrono::steady_clock::now();
  long n = 0;
  while (true) {
    double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (el >= secs) break;
    long due = (long)(el * rate);
    for (; n < due; n++) empty<<<1, 1>>>();
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  cudaDeviceSynchronize();
  printf("launched %ld in %d s (%.0f/s)\n", n, secs, (double)n / secs);
  return 0;
}
