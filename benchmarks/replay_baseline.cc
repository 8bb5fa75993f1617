// The compiled baseline of benchmarks/bench_replay.py: `cma-qemu replay` for one region, in C++.
//
// Reads the subset of the line format (docs/line-format.md) the churn traces use: `alloc DEV
// SIZE[/ALIGN]` (alias `a`), `free ID` (alias `f`), comments and empty lines. It places chunks
// with the policy of the `bf` allocator (cma_qemu/allocators/best_fit.py): size rounded up to
// the 4 KiB page and alignment to at least a page; the smallest hole that holds the aligned
// block, lowest address among equal sizes; an alignment miss walks on to the next larger hole;
// a chunk that lands inside a hole goes to the hole's end when that end is aligned too. Holes
// live in two red-black trees (std::set by size, std::map by start), ids come from a min-heap
// of freed ids, as in the Python runner, so the `ID: 0xSIZE@0xSTART` lines are the same bytes.
//
// Build: g++ -O2 -std=c++17 -Wall -Wextra -Werror -o replay_baseline replay_baseline.cc
// Usage: replay_baseline REGION_START REGION_SIZE < script > allocation-lines

#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <map>
#include <queue>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr uint64_t kPage = 4096;

class BestFit {
 public:
  BestFit(uint64_t start, uint64_t size) {
    by_start_[start] = start + size;
    by_size_.insert({size, start});
  }

  // Start of the block, or false when no hole holds it.
  bool Alloc(uint64_t size, uint64_t alignment, uint64_t* out) {
    const uint64_t mask = alignment - 1;
    for (auto it = by_size_.lower_bound({size, 0}); it != by_size_.end(); ++it) {
      const uint64_t hstart = it->second, hend = hstart + it->first;
      const uint64_t s = (hstart + mask) & ~mask;
      if (s + size <= hend) {
        by_size_.erase(it);
        *out = Take(hstart, hend, s, size, alignment);
        return true;
      }
    }
    return false;
  }

  void Free(uint64_t start, uint64_t size) {
    uint64_t new_start = start, new_end = start + size;
    auto next = by_start_.lower_bound(new_end);
    if (next != by_start_.begin()) {
      auto prev = std::prev(next);
      if (prev->second == start) {  // merge with the hole before
        by_size_.erase({prev->second - prev->first, prev->first});
        new_start = prev->first;
        by_start_.erase(prev);
      }
    }
    if (next != by_start_.end() && next->first == new_end) {  // and the hole after
      by_size_.erase({next->second - next->first, next->first});
      new_end = next->second;
      by_start_.erase(next);
    }
    by_start_[new_start] = new_end;
    by_size_.insert({new_end - new_start, new_start});
  }

 private:
  uint64_t Take(uint64_t hstart, uint64_t hend, uint64_t s, uint64_t size, uint64_t alignment) {
    if (s == hstart) {
      by_start_.erase(hstart);
      if (s + size == hend) return s;  // exact fit
      by_start_[hstart + size] = hend;  // at the start
      by_size_.insert({hend - (hstart + size), hstart + size});
      return s;
    }
    const uint64_t left = hend - (s + size);
    if (left) {
      if (left % alignment == 0) {
        s += left;  // the aligned end of the hole is free too: one fragment, not two
      } else {
        by_start_[s + size] = hend;
        by_size_.insert({left, s + size});
      }
    }
    by_start_[hstart] = s;
    by_size_.insert({s - hstart, hstart});
    return s;
  }

  std::map<uint64_t, uint64_t> by_start_;         // hole start -> end
  std::set<std::pair<uint64_t, uint64_t>> by_size_;  // (size, start)
};

struct Live {
  uint64_t start = 0, size = 0, requested = 0;
  bool live = false;
};

// Kernel memparse of a whole token: strtoull base 0, one optional K/M/G suffix.
bool Memparse(const char* s, uint64_t* out) {
  if (*s < '0' || *s > '9') return false;
  char* end;
  errno = 0;
  uint64_t v = strtoull(s, &end, 0);
  if (errno || end == s) return false;
  unsigned shift = 0;
  switch (*end) {
    case 'K': case 'k': shift = 10; ++end; break;
    case 'M': case 'm': shift = 20; ++end; break;
    case 'G': case 'g': shift = 30; ++end; break;
    default: break;
  }
  if (*end || (shift && v > (UINT64_MAX >> shift))) return false;
  *out = v << shift;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s REGION_START REGION_SIZE < script\n", argv[0]);
    return 2;
  }
  BestFit bf(strtoull(argv[1], nullptr, 0), strtoull(argv[2], nullptr, 0));
  uint64_t free_space = strtoull(argv[2], nullptr, 0);
  std::vector<Live> chunks(1);  // chunks[id]; id 0 unused
  std::priority_queue<int, std::vector<int>, std::greater<int>> freed;
  static char out_buf[1 << 16];
  setvbuf(stdout, out_buf, _IOFBF, sizeof(out_buf));
  char line[1100];
  int failures = 0;
  while (fgets(line, sizeof(line), stdin)) {
    char* words[4] = {};
    int n = 0;
    for (char* tok = strtok(line, " \t\n"); tok && n < 4; tok = strtok(nullptr, " \t\n"))
      words[n++] = tok;
    if (n == 0 || words[0][0] == '#') continue;
    if ((!strcmp(words[0], "alloc") || !strcmp(words[0], "a")) && n == 3) {
      char* slash = strchr(words[2], '/');
      uint64_t requested, alignment = 0;
      if (slash) *slash = '\0';
      if (!Memparse(words[2], &requested) || (slash && !Memparse(slash + 1, &alignment))) {
        fprintf(stderr, "%s: EINVAL: invalid size\n", words[0]);
        ++failures;
        continue;
      }
      const uint64_t size = (requested + kPage - 1) & ~(kPage - 1);
      alignment = alignment < kPage ? kPage : alignment;
      uint64_t start;
      if (free_space < size || !bf.Alloc(size, alignment, &start)) {
        fprintf(stderr, "%s: ENOMEM: no room\n", words[0]);
        ++failures;
        continue;
      }
      free_space -= size;
      int id;
      if (!freed.empty()) {
        id = freed.top();
        freed.pop();
      } else {
        id = static_cast<int>(chunks.size());
        chunks.emplace_back();
      }
      chunks[id] = Live{start, size, requested, true};
      printf("%d: 0x%" PRIx64 "@0x%" PRIx64 "\n", id, requested, start);
    } else if ((!strcmp(words[0], "free") || !strcmp(words[0], "f")) && n == 2) {
      const long id = strtol(words[1], nullptr, 10);
      if (id <= 0 || static_cast<size_t>(id) >= chunks.size() || !chunks[id].live) {
        fprintf(stderr, "%s: ENOENT: no chunk %ld\n", words[0], id);
        ++failures;
        continue;
      }
      bf.Free(chunks[id].start, chunks[id].size);
      free_space += chunks[id].size;
      chunks[id].live = false;
      freed.push(static_cast<int>(id));
    } else {
      fprintf(stderr, "%s: EINVAL: not in the baseline's subset\n", words[0]);
      ++failures;
    }
  }
  return failures ? 1 : 0;
}
