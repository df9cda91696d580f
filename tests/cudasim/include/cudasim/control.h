// cudasim control from the host side: schedule, garbage mode, counters.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cudasim {

// Order of runnable threads between barriers and of blocks in a grid.
enum class Schedule { Forward, Reverse, Random };
// What fresh shared memory and fresh device allocations hold.
enum class FillMode { Random, NaN };

void configure(Schedule s, uint64_t seed, FillMode fill);

struct Counters {
  uint64_t launches, blocks, threads;
};
Counters counters();

// Garbage into a new device allocation (the simulated device's allocator calls this).
void fill_new_allocation(void* p, size_t n);

}  // namespace cudasim
