// The checking CUDA emulator (emulator.h says what it does). This file is compiled without the
// access instrumentation: its own loads and stores are not checked, those of the emulated code
// arrive here through the __tsan_* hooks at the end.
#include "emulator.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <execinfo.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define UDAT_EMU_ASAN 1
#else
#define UDAT_EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#error "the CUDA emulator's fibers are written for x86-64"
#endif

// Switches stacks: saves the callee-saved registers and the FP control words on the current stack,
// stores its pointer in *save_sp, and resumes the stack at load_sp.
extern "C" void udat_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl udat_emu_switch
    .hidden udat_emu_switch
    .type udat_emu_switch, @function
udat_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size udat_emu_switch, .-udat_emu_switch
)");

namespace udat {
namespace emu {
namespace {

// ---------------------------------------------------------------------------------------------
// Configuration and log
// ---------------------------------------------------------------------------------------------

struct Config {
  int64_t seed = 0;
  int64_t sm_count = 4;            // emulated multiprocessors (the host sizes grids from them)
  int64_t resident_blocks = 4;     // blocks that run interleaved at a time
  int64_t smem_optin = 227 * 1024;  // per block, opted in (H100/H200)
  int64_t smem_default = 48 * 1024;
  int64_t free_bytes = int64_t(1) << 30;
  int64_t total_bytes = int64_t(2) << 30;
  int64_t check = 1;  // 0: no race checks (bounds and alignment are always checked)
  int64_t max_blocks_per_sm = 32;  // caps the occupancy the host side is told
};
Config g_cfg;

std::string g_log;  // JSON lines: launches and GEMMs since clear_log()

void log_line(const std::string& line) {
  g_log += line;
  g_log += '\n';
}

std::string demangled_name(const void* fn, const char* fallback) {
  Dl_info info{};
  if (fn && dladdr(fn, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    if (status == 0 && d) {
      std::string s(d);
      std::free(d);
      return s;
    }
  }
  return fallback;
}

// "void udat::cuda::small_c_kernel<float, float, 2>(...)" -> "small_c_kernel<float, float, 2>"
std::string short_name(const std::string& full) {
  std::string s = full;
  const size_t paren = s.find('(');
  if (paren != std::string::npos) s = s.substr(0, paren);
  const size_t lt = s.find('<');
  const size_t scope = s.rfind("::", lt == std::string::npos ? std::string::npos : lt);
  if (scope != std::string::npos) s = s.substr(scope + 2);
  const size_t space = s.rfind(' ', s.find('<'));
  if (space != std::string::npos && space < s.find('<')) s = s.substr(space + 1);
  return s;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Device buffers: what the host side registered for this op call
// ---------------------------------------------------------------------------------------------

struct Region {
  uintptr_t lo, hi;
  std::string name;
  int shared_block;  // -1: global memory; else the linear id of the block owning shared memory
};

class Registry {
 public:
  void add(uintptr_t lo, uintptr_t hi, const std::string& name, int shared_block) {
    for (const Region& r : regions_) {
      if (r.lo == lo && r.hi == hi && r.shared_block == shared_block) return;
    }
    regions_.push_back({lo, hi, name, shared_block});
    dirty_ = true;
    ++generation_;
  }
  void remove_shared() {
    regions_.erase(std::remove_if(regions_.begin(), regions_.end(),
                                  [](const Region& r) { return r.shared_block >= 0; }),
                   regions_.end());
    dirty_ = true;
    ++generation_;
  }
  void clear() {
    regions_.clear();
    dirty_ = true;
    ++generation_;
  }
  // The region holding [a, a + n), or null.
  const Region* find(uintptr_t a, size_t n) {
    if (dirty_) rebuild();
    auto it = std::upper_bound(order_.begin(), order_.end(), a,
                               [&](uintptr_t v, size_t i) { return v < regions_[i].lo; });
    size_t k = size_t(it - order_.begin());
    while (k > 0) {
      --k;
      if (max_hi_[k] < a + n) return nullptr;  // nothing at or before k reaches that far
      const Region& r = regions_[order_[k]];
      if (r.lo <= a && a + n <= r.hi) return &r;
    }
    return nullptr;
  }
  // What to say about an address outside every region: the nearest one.
  std::string describe(uintptr_t a, size_t n) const {
    const Region* best = nullptr;
    uintptr_t best_d = ~uintptr_t(0);
    for (const Region& r : regions_) {
      const uintptr_t d = a < r.lo ? r.lo - a : (a >= r.hi ? a - r.hi + 1 : 0);
      if (d < best_d) {
        best_d = d;
        best = &r;
      }
    }
    std::ostringstream os;
    if (!best) {
      os << "no buffer is registered";
    } else if (a < best->lo) {
      os << (best->lo - a) << " bytes before '" << best->name << "' (" << (best->hi - best->lo)
         << " bytes)";
    } else if (a >= best->lo && a < best->hi) {
      os << "straddles the end of '" << best->name << "' (" << (best->hi - best->lo)
         << " bytes) at offset " << (a - best->lo) << ", " << n << " bytes";
    } else {
      os << (a - best->hi) << " bytes past the end of '" << best->name << "' ("
         << (best->hi - best->lo) << " bytes)";
    }
    return os.str();
  }
  uint64_t generation() const { return generation_; }

 private:
  void rebuild() {
    order_.resize(regions_.size());
    for (size_t i = 0; i < order_.size(); ++i) order_[i] = i;
    std::sort(order_.begin(), order_.end(),
              [&](size_t x, size_t y) { return regions_[x].lo < regions_[y].lo; });
    max_hi_.resize(order_.size());
    uintptr_t m = 0;
    for (size_t k = 0; k < order_.size(); ++k) {
      m = std::max(m, regions_[order_[k]].hi);
      max_hi_[k] = m;
    }
    dirty_ = false;
  }
  std::vector<Region> regions_;
  std::vector<size_t> order_;
  std::vector<uintptr_t> max_hi_;
  bool dirty_ = false;
  uint64_t generation_ = 1;
};
Registry g_registry;

// ---------------------------------------------------------------------------------------------
// Happens-before: barrier epochs within a block, fence + atomic across blocks
// ---------------------------------------------------------------------------------------------

// One access: by thread `thread` of block `block`, in the block's barrier epoch `epoch`, after
// that thread's `fseq` fences.
struct Acc {
  int32_t block;
  int32_t thread;
  uint32_t epoch;
  uint32_t fseq;
};
constexpr int32_t kManyThreads = -2;

// What a thread knows of another block: every access of that block in an epoch before `epoch`,
// and, of thread `thread`, its accesses in `epoch` before its fence number `fseq`.
struct Rel {
  uint32_t epoch = 0;
  int32_t thread = -1;
  uint32_t fseq = 0;
};

Rel join(const Rel& a, const Rel& b) {
  if (a.epoch != b.epoch) return a.epoch > b.epoch ? a : b;
  if (a.thread == b.thread) return {a.epoch, a.thread, std::max(a.fseq, b.fseq)};
  if (a.thread < 0) return b;
  if (b.thread < 0) return a;
  return {a.epoch, -1, 0};  // two threads' partial knowledge of one epoch: keep what both imply
}

void join_into(std::vector<Rel>& dst, const std::vector<Rel>& src) {
  if (src.empty()) return;
  if (dst.size() < src.size()) dst.resize(src.size());
  for (size_t i = 0; i < src.size(); ++i) dst[i] = join(dst[i], src[i]);
}

bool covers(const Rel& r, const Acc& a) {
  if (a.epoch < r.epoch) return true;
  return a.epoch == r.epoch && r.thread >= 0 && r.thread == a.thread && a.fseq < r.fseq;
}

// Shadow state of one 2-byte granule of device memory.
struct Cell {
  uint32_t stamp = 0;  // the launch that wrote this state; older state is empty
  uint8_t has_w = 0, w_atomic = 0, init = 0, has_r = 0;
  Acc w{};
  Acc r{};
  std::vector<Acc>* more = nullptr;  // reads of further blocks
};
constexpr uintptr_t kGranule = 2;
constexpr uintptr_t kPageBytes = 4096;
constexpr size_t kCellsPerPage = kPageBytes / kGranule;

struct Page {
  Cell cells[kCellsPerPage];
  ~Page() {
    for (Cell& c : cells) delete c.more;
  }
};
std::unordered_map<uintptr_t, std::unique_ptr<Page>> g_shadow;
uintptr_t g_last_page_key = ~uintptr_t(0);
Page* g_last_page = nullptr;

Cell& cell_at(uintptr_t addr) {
  const uintptr_t key = addr / kPageBytes;
  if (key != g_last_page_key) {
    auto& slot = g_shadow[key];
    if (!slot) slot = std::make_unique<Page>();
    g_last_page = slot.get();
    g_last_page_key = key;
  }
  return g_last_page->cells[(addr % kPageBytes) / kGranule];
}

// ---------------------------------------------------------------------------------------------
// Threads, blocks, the grid
// ---------------------------------------------------------------------------------------------

enum class St : uint8_t { Ready, Barrier, Collective, Yield, Done };

struct Stack {
  char* base;  // mapping, guard page first
  char* lo;
  char* hi;
};
constexpr size_t kStackBytes = UDAT_EMU_ASAN ? (size_t(512) << 10) : (size_t(256) << 10);
constexpr size_t kGuardBytes = 4096;
std::vector<Stack> g_free_stacks;

Stack take_stack() {
  if (!g_free_stacks.empty()) {
    Stack s = g_free_stacks.back();
    g_free_stacks.pop_back();
#if UDAT_EMU_ASAN
    __asan_unpoison_memory_region(s.lo, size_t(s.hi - s.lo));  // an abandoned fiber's redzones
#endif
    return s;
  }
  void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("CUDA emulator: out of memory for thread stacks");
  mprotect(p, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting
  char* base = static_cast<char*>(p);
  return {base, base + kGuardBytes, base + kGuardBytes + kStackBytes};
}

struct Block;

struct Thread {
  void* sp = nullptr;
  Stack stack{};
  void* asan_fake = nullptr;
  uint3 tid{};
  int lin = 0, lane = 0, warp = 0;
  St st = St::Ready;
  bool checking = false;
  const char* site = nullptr;  // barrier or collective call site
  // a warp collective in flight
  int ckind = 0, carg = 0, cwidth = 32;
  unsigned cmask = 0;
  size_t csize = 0;
  alignas(16) unsigned char cin[16] = {};
  alignas(16) unsigned char cout[16] = {};
  uint32_t fseq = 0;
  std::vector<Rel> vc;        // acquired from other blocks since the block's last barrier
  std::vector<Rel> fence_vc;  // what this thread's last fence releases (own block included)
  bool fenced = false;
  int nstatic = 0;  // static shared declarations reached
  Block* block = nullptr;
};

struct Block {
  uint3 idx{};
  int lin = 0;
  std::vector<Thread> threads;
  uint32_t epoch = 0;
  std::vector<Rel> vc;  // what every thread of the block knows of other blocks
  int done = 0;
  std::vector<std::pair<char*, size_t>> statics;
  char* dyn = nullptr;
  size_t dyn_bytes = 0;
  std::vector<char*> allocations;
};

struct Grid {
  std::string name;
  dim3 grid, block;
  size_t smem = 0;
  void (*entry)(void*) = nullptr;
  void* ctx = nullptr;
  int64_t nblocks = 0;
  int threads_per_block = 0;
  std::mt19937_64 rng;
  std::vector<std::unique_ptr<Block>> resident;
  std::vector<std::unique_ptr<Block>> finished;  // their shared memory lives to the launch's end
  int64_t next_block = 0;
};

Grid* g_grid = nullptr;
Thread* g_cur = nullptr;  // the running CUDA thread, or null on the host
void* g_sched_sp = nullptr;
const void* g_main_stack_bottom = nullptr;
size_t g_main_stack_size = 0;
void* g_main_fake = nullptr;
thread_local bool t_checking = false;
uint32_t g_launch = 0;  // stamp of the running launch
std::string g_error;
std::unordered_map<uintptr_t, std::vector<Rel>> g_sync;  // release clocks of atomic locations
std::unordered_map<const void*, int> g_max_dyn_smem;     // cudaFuncSetAttribute

std::string where(const Thread* t) {
  std::ostringstream os;
  os << "in " << (g_grid ? g_grid->name : std::string("?"));
  if (t && t->block) {
    os << ", block (" << t->block->idx.x << "," << t->block->idx.y << "," << t->block->idx.z
       << "), thread (" << t->tid.x << "," << t->tid.y << "," << t->tid.z << ")";
  }
  os << ", seed " << g_cfg.seed << ", launch " << g_launch;
  return os.str();
}

void to_scheduler() {
  Thread* t = g_cur;
  t->checking = t_checking;
  t_checking = false;
#if UDAT_EMU_ASAN
  __sanitizer_start_switch_fiber(t->st == St::Done ? nullptr : &t->asan_fake,
                                 g_main_stack_bottom, g_main_stack_size);
#endif
  udat_emu_switch(&t->sp, g_sched_sp);
#if UDAT_EMU_ASAN
  __sanitizer_finish_switch_fiber(t->asan_fake, &g_main_stack_bottom, &g_main_stack_size);
#endif
  t_checking = t->checking;
}

// Records the first violation and leaves the thread for good: the launch is abandoned.
// UDAT_CUDA_EMU_BACKTRACE=1 adds the emulated thread's call stack to a report.
std::string backtrace_text() {
  const char* env = std::getenv("UDAT_CUDA_EMU_BACKTRACE");
  if (!env || env[0] != '1') return "";
  void* frames[32];
  const int n = backtrace(frames, 32);
  std::ostringstream os;
  os << "\n  call stack:";
  for (int i = 0; i < n; ++i) {
    Dl_info info{};
    os << "\n    " << frames[i];
    if (dladdr(frames[i], &info)) {
      if (info.dli_sname) os << " " << demangled_name(info.dli_saddr, info.dli_sname);
      os << " [" << (info.dli_fname ? info.dli_fname : "?") << " +0x" << std::hex
         << (reinterpret_cast<uintptr_t>(frames[i]) - reinterpret_cast<uintptr_t>(info.dli_fbase))
         << std::dec << "]";
    }
  }
  return os.str();
}

[[noreturn]] void fail(const std::string& what) {
  if (g_error.empty())
    g_error = "CUDA emulator: " + what + " (" + where(g_cur) + ")" + backtrace_text();
  t_checking = false;
  if (!g_cur) throw std::runtime_error(g_error);
  g_cur->st = St::Done;
  to_scheduler();
  std::abort();  // not reached: a failed thread is never resumed
}

[[noreturn]] void fiber_main() {
#if UDAT_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_main_stack_bottom, &g_main_stack_size);
#endif
  g_grid->entry(g_grid->ctx);
  t_checking = false;
  g_cur->st = St::Done;
  to_scheduler();
  std::abort();
}

void start_thread(Thread& t) {
  t.stack = take_stack();
  uintptr_t top = reinterpret_cast<uintptr_t>(t.stack.hi) & ~uintptr_t(15);
  auto* s = reinterpret_cast<uint64_t*>(top);
  s[-1] = 0;                                              // fiber_main "returns" nowhere
  s[-2] = reinterpret_cast<uint64_t>(&fiber_main);        // popped by udat_emu_switch's ret
  for (int r = 3; r <= 8; ++r) s[-r] = 0;                 // rbp rbx r12 r13 r14 r15
  const uint32_t ctl[2] = {0x1F80u, 0x037Fu};             // MXCSR, x87 control word
  std::memcpy(&s[-9], ctl, sizeof(ctl));
  t.sp = &s[-9];
  t.st = St::Ready;
}

void resume(Thread& t) {
  g_cur = &t;
#if UDAT_EMU_ASAN
  __sanitizer_start_switch_fiber(&g_main_fake, t.stack.lo, size_t(t.stack.hi - t.stack.lo));
#endif
  udat_emu_switch(&g_sched_sp, t.sp);
#if UDAT_EMU_ASAN
  __sanitizer_finish_switch_fiber(g_main_fake, nullptr, nullptr);
#endif
  g_cur = nullptr;
}

char* alloc_shared(Block& b, size_t bytes, size_t align, const char* what) {
  align = std::max<size_t>(align, 16);
  const size_t padded = (bytes + align - 1) / align * align;
  char* p = static_cast<char*>(std::aligned_alloc(align, std::max<size_t>(padded, align)));
  if (!p) throw std::runtime_error("CUDA emulator: out of memory for shared memory");
  std::memset(p, 0xFF, padded);  // undefined on the device: NaN patterns here
  b.allocations.push_back(p);
  g_registry.add(reinterpret_cast<uintptr_t>(p), reinterpret_cast<uintptr_t>(p) + bytes, what,
                 b.lin);
  return p;
}

void start_block(Grid& g, int64_t lin) {
  auto b = std::make_unique<Block>();
  b->lin = static_cast<int>(lin);
  b->idx = {unsigned(lin % g.grid.x), unsigned((lin / g.grid.x) % g.grid.y),
            unsigned(lin / (int64_t(g.grid.x) * g.grid.y))};
  b->threads.resize(size_t(g.threads_per_block));
  if (g.smem > 0) {
    b->dyn = alloc_shared(*b, g.smem, 128, "dynamic shared memory");
    b->dyn_bytes = g.smem;
  }
  for (int i = 0; i < g.threads_per_block; ++i) {
    Thread& t = b->threads[size_t(i)];
    t.lin = i;
    t.tid = {unsigned(i % g.block.x), unsigned((i / g.block.x) % g.block.y),
             unsigned(i / (g.block.x * g.block.y))};
    t.lane = i % 32;
    t.warp = i / 32;
    t.block = b.get();
    start_thread(t);
  }
  g.resident.push_back(std::move(b));
}

void release_block_stacks(Block& b) {
  for (Thread& t : b.threads) {
    if (t.stack.base) g_free_stacks.push_back(t.stack);
    t.stack = {};
  }
}

std::string state_summary(const Block& b) {
  std::ostringstream os;
  std::map<std::string, int> counts;
  for (const Thread& t : b.threads) {
    switch (t.st) {
      case St::Done: counts["exited"]++; break;
      case St::Barrier: counts[std::string("at __syncthreads ") + t.site]++; break;
      case St::Collective: counts[std::string("at a warp collective ") + t.site]++; break;
      default: counts["running"]++; break;
    }
  }
  bool first = true;
  for (auto& kv : counts) {
    os << (first ? "" : "; ") << kv.second << " " << kv.first;
    first = false;
  }
  return os.str();
}

[[noreturn]] void fail_block(const Block& b, const std::string& what) {
  if (g_error.empty()) {
    std::ostringstream os;
    os << "CUDA emulator: " << what << " (in " << g_grid->name << ", block (" << b.idx.x << ","
       << b.idx.y << "," << b.idx.z << "): " << state_summary(b) << "; seed " << g_cfg.seed
       << ", launch " << g_launch << ")";
    g_error = os.str();
  }
  throw std::runtime_error(g_error);
}

int source_lane(const Thread& t, int width) {
  const int base = t.lane / width * width;
  const int pos = t.lane % width;
  switch (t.ckind) {
    case kShflIdx: return base + ((t.carg % width) + width) % width;
    case kShflXor: {
      const int s = pos ^ t.carg;
      return s < width ? base + s : t.lane;
    }
    case kShflDown: return pos + t.carg < width ? t.lane + t.carg : t.lane;
    case kShflUp: return pos - t.carg >= 0 ? t.lane - t.carg : t.lane;
    default: return t.lane;
  }
}

// Completes the warp collectives whose every named lane has arrived.
void resolve_collectives(Block& b) {
  const int n = static_cast<int>(b.threads.size());
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int lanes = std::min(32, n - w0);
    for (int l = 0; l < lanes; ++l) {
      Thread& t = b.threads[size_t(w0 + l)];
      if (t.st != St::Collective) continue;
      const unsigned mask = t.cmask;
      if (!((mask >> l) & 1u)) fail_block(b, "a warp collective whose mask leaves out its own lane");
      if (lanes < 32 && (mask >> lanes) != 0u)
        fail_block(b, "a warp collective's mask names lanes the block does not have");
      bool complete = true;
      for (int k = 0; k < lanes; ++k) {
        if (!((mask >> k) & 1u)) continue;
        const Thread& o = b.threads[size_t(w0 + k)];
        if (o.st == St::Done)
          fail_block(b, std::string("a warp collective at ") + t.site +
                            " waits for a lane that has exited");
        if (o.st != St::Collective) {
          complete = false;
          continue;
        }
        if (o.cmask != mask || o.ckind != t.ckind || o.cwidth != t.cwidth ||
            o.csize != t.csize || std::strcmp(o.site, t.site) != 0) {
          fail_block(b, std::string("lanes of a warp meet at different collectives: ") + t.site +
                            " and " + o.site);
        }
      }
      if (!complete) continue;
      // Every named lane is here: compute the results of all of them at once.
      unsigned ballot = 0;
      for (int k = 0; k < lanes; ++k) {
        if ((mask >> k) & 1u) {
          int p;
          std::memcpy(&p, b.threads[size_t(w0 + k)].cin, sizeof(int));
          if (t.ckind == kBallot && p) ballot |= 1u << k;
        }
      }
      for (int k = 0; k < lanes; ++k) {
        if (!((mask >> k) & 1u)) continue;
        Thread& o = b.threads[size_t(w0 + k)];
        if (o.ckind == kBallot) {
          std::memcpy(o.cout, &ballot, sizeof(unsigned));
        } else {
          const int src = source_lane(o, o.cwidth);
          if (src >= lanes || !((mask >> src) & 1u))
            fail_block(b, std::string("a shuffle at ") + o.site +
                              " reads a lane outside its mask");
          std::memcpy(o.cout, b.threads[size_t(w0 + src)].cin, o.csize);
        }
        o.st = St::Ready;
      }
    }
  }
}

void resolve(Block& b) {
  int at_barrier = 0;
  for (Thread& t : b.threads) {
    if (t.st == St::Yield) t.st = St::Ready;
    if (t.st == St::Barrier) ++at_barrier;
  }
  resolve_collectives(b);
  const int live = static_cast<int>(b.threads.size()) - b.done;
  if (at_barrier > 0 && at_barrier == live) {
    if (b.done > 0) fail_block(b, "__syncthreads reached after other threads of the block exited");
    const char* site = nullptr;
    for (Thread& t : b.threads) {
      if (!site) site = t.site;
      if (std::strcmp(site, t.site) != 0)
        fail_block(b, std::string("threads of a block wait at different __syncthreads: ") + site +
                          " and " + t.site);
    }
    // The barrier: every access before it happens before every access after it, and what one
    // thread acquired from other blocks, all of them now know.
    for (Thread& t : b.threads) {
      join_into(b.vc, t.vc);
      t.vc.clear();
    }
    ++b.epoch;
    for (Thread& t : b.threads) t.st = St::Ready;
  }
}

// Runs every ready thread of the block, in a seeded order, to its next switch point.
void step(Grid& g, Block& b) {
  std::vector<Thread*> ready;
  ready.reserve(b.threads.size());
  for (Thread& t : b.threads) {
    if (t.st == St::Ready) ready.push_back(&t);
  }
  std::shuffle(ready.begin(), ready.end(), g.rng);
  for (Thread* t : ready) {
    resume(*t);
    if (!g_error.empty()) throw std::runtime_error(g_error);
    if (t->st == St::Done) ++b.done;
  }
  resolve(b);
  if (b.done == static_cast<int>(b.threads.size())) return;
  for (const Thread& t : b.threads) {
    if (t.st == St::Ready) return;
  }
  fail_block(b, "deadlock: no thread of the block can go on");
}

// ---------------------------------------------------------------------------------------------
// Checked accesses
// ---------------------------------------------------------------------------------------------

bool ordered_before_me(const Acc& a, const Thread& t) {
  const Block& b = *t.block;
  if (a.block == b.lin) return a.thread == t.lin || a.epoch < b.epoch;
  Rel r;
  if (size_t(a.block) < b.vc.size()) r = b.vc[size_t(a.block)];
  if (size_t(a.block) < t.vc.size()) r = join(r, t.vc[size_t(a.block)]);
  return covers(r, a);
}

std::string acc_text(const Acc& a) {
  std::ostringstream os;
  os << "thread " << (a.thread == kManyThreads ? std::string("(several)") : std::to_string(a.thread))
     << " of block " << a.block;
  return os.str();
}

enum Kind { kRead = 0, kWrite = 1, kAtomic = 2 };

void race(const char* what, uintptr_t addr, const Acc& other, const Region* r) {
  std::ostringstream os;
  os << "data race: " << what << " of '" << (r ? r->name : std::string("?")) << "' at byte "
     << (r ? addr - r->lo : addr) << ", unordered with an access by " << acc_text(other)
     << " (no __syncthreads between them"
     << (other.block != g_cur->block->lin ? ", or no __threadfence + atomic" : "") << ")";
  fail(os.str());
}

void check_cell(uintptr_t addr, int kind, const Region* r) {
  Thread& t = *g_cur;
  Cell& c = cell_at(addr);
  if (c.stamp != g_launch) {
    delete c.more;
    c = Cell{};
    c.stamp = g_launch;
  }
  const Acc me{t.block->lin, t.lin, t.block->epoch, t.fseq};
  if (kind == kRead) {
    if (r->shared_block >= 0 && !c.init) {
      std::ostringstream os;
      os << "read of shared memory never written in this block: '" << r->name << "' at byte "
         << (addr - r->lo);
      fail(os.str());
    }
    if (c.has_w && !(c.w.block == me.block && c.w.thread == me.thread) &&
        !ordered_before_me(c.w, t))
      race(c.w_atomic ? "a read after an atomic" : "a read after a write", addr, c.w, r);
    // Keep, per block, its latest reading epoch (and the reader, while there is one).
    auto merge = [&](Acc& rec) {
      if (me.epoch > rec.epoch) {
        rec = me;
      } else if (me.epoch == rec.epoch) {
        if (rec.thread == me.thread) {
          rec.fseq = std::max(rec.fseq, me.fseq);
        } else {
          rec.thread = kManyThreads;
        }
      }
    };
    if (!c.has_r) {
      c.r = me;
      c.has_r = 1;
    } else if (c.r.block == me.block) {
      merge(c.r);
    } else {
      if (!c.more) c.more = new std::vector<Acc>();
      bool found = false;
      for (Acc& rec : *c.more) {
        if (rec.block == me.block) {
          merge(rec);
          found = true;
          break;
        }
      }
      if (!found) c.more->push_back(me);
    }
    return;
  }
  // A write, plain or atomic.
  const bool atomic = kind == kAtomic;
  if (c.has_w && !(atomic && c.w_atomic) &&
      !(c.w.block == me.block && c.w.thread == me.thread) && !ordered_before_me(c.w, t))
    race(atomic ? "an atomic after a plain write" : "a write after a write", addr, c.w, r);
  auto check_read = [&](const Acc& rec) {
    const bool mine = rec.block == me.block && rec.thread == me.thread;
    if (mine) return;
    bool ok;
    if (rec.thread == kManyThreads) {
      ok = rec.block == me.block ? rec.epoch < t.block->epoch : [&] {
        Acc probe = rec;
        probe.thread = -3;  // covered only by a whole epoch
        return ordered_before_me(probe, t);
      }();
    } else {
      ok = ordered_before_me(rec, t);
    }
    if (!ok) race("a write after a read", addr, rec, r);
  };
  if (c.has_r) check_read(c.r);
  if (c.more) {
    for (const Acc& rec : *c.more) check_read(rec);
    c.more->clear();
  }
  c.has_r = 0;
  c.w = me;
  c.has_w = 1;
  c.w_atomic = atomic;
  c.init = 1;
}

const Region* g_last_region = nullptr;
uint64_t g_last_region_gen = 0;

void access(const void* p, size_t n, int kind, bool natural) {
  Thread* t = g_cur;
  if (!t || n == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a >= reinterpret_cast<uintptr_t>(t->stack.lo) && a < reinterpret_cast<uintptr_t>(t->stack.hi))
    return;  // the thread's own locals
  const Region* r = nullptr;
  if (g_last_region && g_last_region_gen == g_registry.generation() && g_last_region->lo <= a &&
      a + n <= g_last_region->hi) {
    r = g_last_region;
  } else {
    r = g_registry.find(a, n);
    g_last_region = r;
    g_last_region_gen = g_registry.generation();
  }
  if (!r) {
    std::ostringstream os;
    os << "out-of-bounds " << (kind == kRead ? "read" : "write") << " of " << n
       << " bytes: the address " << g_registry.describe(a, n);
    Dl_info info{};
    if (dladdr(p, &info) && info.dli_sname) os << " (the host symbol " << info.dli_sname << ")";
    fail(os.str());
  }
  if (r->shared_block >= 0 && r->shared_block != t->block->lin)
    fail("access to another block's shared memory '" + r->name + "'");
  if (natural && (n & (n - 1)) == 0 && a % n != 0) {
    std::ostringstream os;
    os << "misaligned " << n << "-byte " << (kind == kRead ? "load" : "store") << " of '"
       << r->name << "' at byte " << (a - r->lo);
    fail(os.str());
  }
  if (!g_cfg.check) return;
  for (uintptr_t g = a & ~(kGranule - 1); g < a + n; g += kGranule) check_cell(g, kind, r);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The interface of emulator.h
// ---------------------------------------------------------------------------------------------

uint3 thread_idx() { return g_cur->tid; }
uint3 block_idx() { return g_cur->block->idx; }
dim3 block_dim() { return g_grid->block; }
dim3 grid_dim() { return g_grid->grid; }

void kernel_body_begins() { t_checking = true; }

void* static_shared_bytes(size_t bytes, size_t align) {
  Thread& t = *g_cur;
  Block& b = *t.block;
  const size_t k = size_t(t.nstatic++);
  if (k == b.statics.size()) {
    b.statics.emplace_back(alloc_shared(b, bytes, align, "static shared memory"), bytes);
  }
  if (b.statics[k].second != bytes)
    fail("threads of a block declare different static shared arrays");
  return b.statics[k].first;
}

void* dynamic_shared_bytes(size_t align) {
  Block& b = *g_cur->block;
  if (!b.dyn) fail("dynamic shared memory used by a launch that gave it none");
  if (reinterpret_cast<uintptr_t>(b.dyn) % align != 0) fail("dynamic shared memory misaligned");
  return b.dyn;
}

void check_vector_access(const void* p, size_t bytes) {
  if (!g_cur) return;
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    const bool saved = t_checking;
    t_checking = false;
    const Region* r = g_registry.find(reinterpret_cast<uintptr_t>(p), bytes);
    std::ostringstream os;
    os << "misaligned " << bytes << "-byte vector access";
    if (r) os << " of '" << r->name << "' at byte " << (reinterpret_cast<uintptr_t>(p) - r->lo);
    os << " (address " << p << ")";
    t_checking = saved;
    fail(os.str());
  }
}

void collective(int kind, unsigned mask, const void* in, void* out, size_t size, int arg,
                int width, const char* site) {
  Thread& t = *g_cur;
  if (size > sizeof(t.cin)) fail("a warp collective on a value wider than 16 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fail("a shuffle width that is not a power of two up to 32");
  t.ckind = kind;
  t.cmask = mask;
  t.carg = arg;
  t.cwidth = width;
  t.csize = size;
  std::memcpy(t.cin, in, size);
  t.site = site;
  t.st = St::Collective;
  to_scheduler();
  std::memcpy(out, t.cout, kind == kBallot ? sizeof(unsigned) : size);
}

const char* site_name(const char* file, int line) {
  static std::map<std::pair<const char*, int>, std::string> names;
  auto it = names.find({file, line});
  if (it == names.end()) {
    std::string f(file ? file : "?");
    const size_t slash = f.rfind('/');
    if (slash != std::string::npos) f = f.substr(slash + 1);
    it = names.emplace(std::make_pair(file, line), f + ":" + std::to_string(line)).first;
  }
  return it->second.c_str();
}

void syncthreads_at(const char* site) {
  Thread& t = *g_cur;
  t.site = site;
  t.st = St::Barrier;
  to_scheduler();
}

void threadfence() {
  Thread& t = *g_cur;
  ++t.fseq;
  t.fence_vc = t.block->vc;
  join_into(t.fence_vc, t.vc);
  if (t.fence_vc.size() <= size_t(t.block->lin)) t.fence_vc.resize(size_t(t.block->lin) + 1);
  t.fence_vc[size_t(t.block->lin)] = Rel{t.block->epoch, t.lin, t.fseq};
  t.fenced = true;
}

void atomic(int op, void* p, size_t size, int type, const void* v, const void* compare,
            void* old) {
  Thread& t = *g_cur;
  // Blocks interleave here, in the seeded order.
  t.st = St::Yield;
  to_scheduler();
  const bool saved = t_checking;
  access(p, size, kAtomic, true);
  t_checking = false;
  // Release what the last fence covers; acquire what earlier atomics here released.
  auto& clock = g_sync[reinterpret_cast<uintptr_t>(p)];
  if (t.fenced) join_into(clock, t.fence_vc);
  join_into(t.vc, clock);
  auto rmw = [&](auto* q, auto val, auto cmp) {
    using T = std::remove_pointer_t<decltype(q)>;
    const T o = *q;
    switch (op) {
      case kAtomicAdd: *q = T(o + val); break;
      case kAtomicInc:
        if constexpr (std::is_integral_v<T>) *q = (o >= val) ? T(0) : T(o + 1);
        break;
      case kAtomicExch: *q = val; break;
      case kAtomicCas:
        if (o == cmp) *q = val;
        break;
      case kAtomicMax: *q = std::max(o, val); break;
      default: break;
    }
    std::memcpy(old, &o, sizeof(T));
  };
  if (type == 2 && size == 4) {
    float a, c;
    std::memcpy(&a, v, 4);
    std::memcpy(&c, compare, 4);
    rmw(static_cast<float*>(p), a, c);
  } else if (type == 2 && size == 8) {
    double a, c;
    std::memcpy(&a, v, 8);
    std::memcpy(&c, compare, 8);
    rmw(static_cast<double*>(p), a, c);
  } else if (size == 4) {
    uint32_t a, c;
    std::memcpy(&a, v, 4);
    std::memcpy(&c, compare, 4);
    if (type == 1) {
      rmw(static_cast<int32_t*>(p), int32_t(a), int32_t(c));
    } else {
      rmw(static_cast<uint32_t*>(p), a, c);
    }
  } else if (size == 8) {
    uint64_t a, c;
    std::memcpy(&a, v, 8);
    std::memcpy(&c, compare, 8);
    if (type == 1) {
      rmw(static_cast<int64_t*>(p), int64_t(a), int64_t(c));
    } else {
      rmw(static_cast<uint64_t*>(p), a, c);
    }
  } else {
    fail("an atomic on a type the emulator does not know");
  }
  t_checking = saved;
}

void run_grid(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem,
              void (*entry)(void*), void* ctx) {
  if (g_grid) throw std::runtime_error("CUDA emulator: a kernel launched from a kernel");
  const std::string full = demangled_name(fn, name);
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  auto reject = [&](const std::string& why) {
    throw std::runtime_error("CUDA emulator: invalid launch of " + full + ": " + why);
  };
  if (nblocks <= 0) reject("an empty grid");
  if (grid.y > 65535 || grid.z > 65535) reject("grid.y or grid.z above 65535");
  if (threads <= 0 || threads > 1024) reject("threads per block not in [1, 1024]");
  const auto attr = g_max_dyn_smem.find(fn);
  const int64_t smem_limit = attr == g_max_dyn_smem.end() ? g_cfg.smem_default : attr->second;
  if (int64_t(smem) > smem_limit) {
    reject(std::to_string(smem) + " bytes of dynamic shared memory, above the " +
           std::to_string(smem_limit) +
           " the kernel may use (cudaFuncSetAttribute raises it, up to the opt-in limit)");
  }
  {
    std::ostringstream os;
    os << "{\"kind\": \"kernel\", \"name\": \"" << json_escape(short_name(full))
       << "\", \"grid\": [" << grid.x << ", " << grid.y << ", " << grid.z << "], \"block\": ["
       << block.x << ", " << block.y << ", " << block.z << "], \"smem\": " << smem << "}";
    log_line(os.str());
  }
  Grid g;
  g.name = short_name(full);
  g.grid = grid;
  g.block = block;
  g.smem = smem;
  g.entry = entry;
  g.ctx = ctx;
  g.nblocks = nblocks;
  g.threads_per_block = static_cast<int>(threads);
  ++g_launch;
  g.rng.seed(uint64_t(g_cfg.seed) * 0x9E3779B97F4A7C15ull + g_launch);
  g_grid = &g;
  g_error.clear();
  g_sync.clear();
  auto cleanup = [&] {
    for (auto& b : g.resident) release_block_stacks(*b);
    for (auto& b : g.finished) {
      for (char* p : b->allocations) std::free(p);
    }
    for (auto& b : g.resident) {
      for (char* p : b->allocations) std::free(p);
    }
    g_registry.remove_shared();
    g_grid = nullptr;
    g_cur = nullptr;
    t_checking = false;
  };
  try {
    while (true) {
      while (int64_t(g.resident.size()) < std::max<int64_t>(1, g_cfg.resident_blocks) &&
             g.next_block < g.nblocks) {
        start_block(g, g.next_block++);
      }
      if (g.resident.empty()) break;
      const size_t pick = size_t(g.rng() % g.resident.size());
      Block& b = *g.resident[pick];
      step(g, b);
      if (b.done == static_cast<int>(b.threads.size())) {
        release_block_stacks(b);
        g.finished.push_back(std::move(g.resident[pick]));
        g.resident.erase(g.resident.begin() + static_cast<std::ptrdiff_t>(pick));
      }
    }
  } catch (...) {
    cleanup();
    throw;
  }
  cleanup();
}

void register_buffer(const void* p, size_t bytes, const char* name) {
  if (!p || bytes == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  g_registry.add(a, a + bytes, name ? name : "?", -1);
}

void begin_call() {
  g_registry.clear();
  g_last_region = nullptr;
}

struct BlasState {
  cublasMath_t mode = CUBLAS_DEFAULT_MATH;
};
BlasState g_blas;

cublasHandle_t blas_handle(bool tf32_allowed) {
  // As torch's own handle: TF32 math when the global switch allows it.
  g_blas.mode = tf32_allowed ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH;
  return reinterpret_cast<cublasHandle_t>(&g_blas);
}

// One stream: its launches run one after another and share the pool's first counters, which
// every kernel must leave at zero (a kernel that does not breaks the next one).
void* counter_slots(size_t count) {
  constexpr size_t kPool = 4096;
  static uint32_t pool[kPool] = {};
  if (count > kPool) throw std::runtime_error("CUDA emulator: too many counters asked for");
  register_buffer(pool, count * sizeof(uint32_t), "last-block counters");
  return pool;
}

void set_config(const std::string& key, int64_t value) {
  if (key == "seed") g_cfg.seed = value;
  else if (key == "sm_count") g_cfg.sm_count = value;
  else if (key == "resident_blocks") g_cfg.resident_blocks = value;
  else if (key == "smem_optin") g_cfg.smem_optin = value;
  else if (key == "free_bytes") g_cfg.free_bytes = value;
  else if (key == "total_bytes") g_cfg.total_bytes = value;
  else if (key == "check") g_cfg.check = value;
  else if (key == "max_blocks_per_sm") g_cfg.max_blocks_per_sm = value;
  else throw std::invalid_argument("CUDA emulator: unknown setting '" + key + "'");
}

int64_t get_config(const std::string& key) {
  if (key == "seed") return g_cfg.seed;
  if (key == "sm_count") return g_cfg.sm_count;
  if (key == "resident_blocks") return g_cfg.resident_blocks;
  if (key == "smem_optin") return g_cfg.smem_optin;
  if (key == "free_bytes") return g_cfg.free_bytes;
  if (key == "total_bytes") return g_cfg.total_bytes;
  if (key == "check") return g_cfg.check;
  if (key == "max_blocks_per_sm") return g_cfg.max_blocks_per_sm;
  if (key == "instrumented") return UDAT_EMU_ASAN ? 0 : 1;  // the access hooks are compiled in
  throw std::invalid_argument("CUDA emulator: unknown setting '" + key + "'");
}

std::string log_json() { return g_log; }
void clear_log() { g_log.clear(); }

cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > g_cfg.smem_optin) return cudaErrorInvalidValue;
  g_max_dyn_smem[fn] = value;
  return cudaSuccess;
}

// Blocks per multiprocessor from threads and shared memory (an H100/H200's limits; the emulator
// knows no register counts: tests/cuda_emu checks those against the compiler separately).
cudaError_t occupancy(int* blocks, const void* fn, int threads, size_t smem) {
  (void)fn;
  if (threads <= 0 || threads > 1024) return cudaErrorInvalidValue;
  int n = std::min<int>({32, 2048 / threads, int(g_cfg.max_blocks_per_sm)});
  if (smem > 0) n = std::min<int64_t>(n, (228 * 1024) / int64_t(smem + 1024));
  *blocks = std::max(0, n);
  return cudaSuccess;
}

}  // namespace emu
}  // namespace udat

// ---------------------------------------------------------------------------------------------
// Runtime and cuBLAS entry points of the emulation build
// ---------------------------------------------------------------------------------------------

using udat::emu::g_cfg;

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = int(g_cfg.sm_count); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(g_cfg.smem_optin); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *free_bytes = size_t(g_cfg.free_bytes);
  *total_bytes = size_t(g_cfg.total_bytes);
  return cudaSuccess;
}

cudaError_t cudaGetLastError() { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid value (emulator)";
}

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  reinterpret_cast<udat::emu::BlasState*>(handle)->mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  *mode = reinterpret_cast<udat::emu::BlasState*>(handle)->mode;
  return CUBLAS_STATUS_SUCCESS;
}

namespace {

const char* dtype_name(cudaDataType t) {
  switch (t) {
    case CUDA_R_32F: return "f32";
    case CUDA_R_64F: return "f64";
    case CUDA_R_16F: return "f16";
    case CUDA_R_16BF: return "bf16";
  }
  return "?";
}

size_t dtype_size(cudaDataType t) {
  switch (t) {
    case CUDA_R_32F: return 4;
    case CUDA_R_64F: return 8;
    case CUDA_R_16F:
    case CUDA_R_16BF: return 2;
  }
  return 0;
}

double load_elem(const void* p, cudaDataType t, size_t i) {
  switch (t) {
    case CUDA_R_32F: return static_cast<const float*>(p)[i];
    case CUDA_R_64F: return static_cast<const double*>(p)[i];
    case CUDA_R_16BF: {
      uint16_t h;
      std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2);
      const uint32_t bits = uint32_t(h) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    case CUDA_R_16F: {
      uint16_t h;
      std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2);
      const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
      double v;
      if (exp == 0) {
        v = std::ldexp(double(man), -24);
      } else if (exp == 31) {
        v = man ? NAN : INFINITY;
      } else {
        v = std::ldexp(double(man | 0x400u), int(exp) - 25);
      }
      return sign ? -v : v;
    }
  }
  return NAN;
}

void store_elem(void* p, cudaDataType t, size_t i, double v) {
  if (t == CUDA_R_32F) {
    static_cast<float*>(p)[i] = static_cast<float>(v);
  } else if (t == CUDA_R_64F) {
    static_cast<double*>(p)[i] = v;
  }
}

}  // namespace

// The GEMM stand-in: the same call as cuBLAS (column-major, op(A) m×k, op(B) k×n, C m×n), checked
// and logged, computed on the CPU in double and rounded to C's type.
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t) {
  using udat::emu::g_registry;
  auto reject = [&](const std::string& why) -> cublasStatus_t {
    throw std::runtime_error("CUDA emulator: cublasGemmEx rejected: " + why);
  };
  const cublasMath_t mode = reinterpret_cast<udat::emu::BlasState*>(handle)->mode;
  if (m < 0 || n < 0 || k < 0) return reject("negative size");
  const int a_rows = transa == CUBLAS_OP_N ? m : k, a_cols = transa == CUBLAS_OP_N ? k : m;
  const int b_rows = transb == CUBLAS_OP_N ? k : n, b_cols = transb == CUBLAS_OP_N ? n : k;
  if (lda < std::max(1, a_rows)) return reject("lda below the rows of A");
  if (ldb < std::max(1, b_rows)) return reject("ldb below the rows of B");
  if (ldc < std::max(1, m)) return reject("ldc below the rows of C");
  if (Atype != Btype) return reject("A and B of different types");
  const bool f32 = Atype == CUDA_R_32F, f64 = Atype == CUDA_R_64F;
  if (f64) {
    if (computeType != CUBLAS_COMPUTE_64F && computeType != CUBLAS_COMPUTE_64F_PEDANTIC)
      return reject("a float64 GEMM without a float64 compute type");
    if (Ctype != CUDA_R_64F) return reject("a float64 GEMM with a non-float64 result");
  } else {
    if (computeType != CUBLAS_COMPUTE_32F && computeType != CUBLAS_COMPUTE_32F_PEDANTIC) {
      return reject(std::string("a ") + dtype_name(Atype) +
                    " GEMM with a reduced compute type (" + std::to_string(int(computeType)) +
                    "): docs/math.md, precision policy for float32");
    }
    if (f32 && computeType == CUBLAS_COMPUTE_32F && (int(mode) & 0xF) == CUBLAS_TF32_TENSOR_OP_MATH)
      return reject("a float32 GEMM on a handle in TF32 math mode: docs/math.md, precision "
                    "policy for float32");
    if (Ctype != CUDA_R_32F && Ctype != Atype) return reject("an unsupported result type");
  }
  if (Ctype != CUDA_R_32F && Ctype != CUDA_R_64F)
    return reject("the stand-in writes float32 or float64 results only");
  auto extent = [](int rows, int cols, int ld) -> size_t {
    return rows == 0 || cols == 0 ? 0 : size_t(cols - 1) * size_t(ld) + size_t(rows);
  };
  auto check_bounds = [&](const void* p, size_t elems, cudaDataType t, const char* what) {
    if (elems == 0) return;
    const size_t bytes = elems * dtype_size(t);
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (!g_registry.find(a, bytes))
      reject(std::string(what) + " reaches outside its buffer: " + g_registry.describe(a, bytes));
    if (a % dtype_size(t) != 0) reject(std::string(what) + " misaligned");
  };
  check_bounds(A, extent(a_rows, a_cols, lda), Atype, "A");
  check_bounds(B, extent(b_rows, b_cols, ldb), Btype, "B");
  check_bounds(C, extent(m, n, ldc), Ctype, "C");
  const double al = f64 ? *static_cast<const double*>(alpha) : *static_cast<const float*>(alpha);
  const double be = f64 ? *static_cast<const double*>(beta) : *static_cast<const float*>(beta);
  {
    std::ostringstream os;
    os << "{\"kind\": \"gemm\", \"transa\": \"" << (transa == CUBLAS_OP_N ? "N" : "T")
       << "\", \"transb\": \"" << (transb == CUBLAS_OP_N ? "N" : "T") << "\", \"m\": " << m
       << ", \"n\": " << n << ", \"k\": " << k << ", \"a\": \"" << dtype_name(Atype)
       << "\", \"b\": \"" << dtype_name(Btype) << "\", \"c\": \"" << dtype_name(Ctype)
       << "\", \"lda\": " << lda << ", \"ldb\": " << ldb << ", \"ldc\": " << ldc
       << ", \"alpha\": " << al << ", \"beta\": " << be << ", \"compute\": " << int(computeType)
       << ", \"math_mode\": " << int(mode) << ", \"c_ptr\": " << reinterpret_cast<uintptr_t>(C)
       << ", \"c_bytes\": " << extent(m, n, ldc) * dtype_size(Ctype) << "}";
    udat::emu::log_line(os.str());
  }
  // op(A) as m×k and op(B) as k×n, row-major doubles.
  std::vector<double> a(size_t(m) * k), b(size_t(k) * n), acc(static_cast<size_t>(n));
  for (int i = 0; i < m; ++i) {
    for (int l = 0; l < k; ++l) {
      const size_t idx = transa == CUBLAS_OP_N ? size_t(l) * lda + i : size_t(i) * lda + l;
      a[size_t(i) * k + l] = load_elem(A, Atype, idx);
    }
  }
  for (int l = 0; l < k; ++l) {
    for (int j = 0; j < n; ++j) {
      const size_t idx = transb == CUBLAS_OP_N ? size_t(j) * ldb + l : size_t(l) * ldb + j;
      b[size_t(l) * n + j] = load_elem(B, Btype, idx);
    }
  }
  for (int i = 0; i < m; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int l = 0; l < k; ++l) {
      const double av = a[size_t(i) * k + l];
      const double* brow = &b[size_t(l) * n];
      for (int j = 0; j < n; ++j) acc[size_t(j)] += av * brow[j];
    }
    for (int j = 0; j < n; ++j) {
      const size_t idx = size_t(j) * ldc + i;
      double v = al * acc[size_t(j)];
      if (be != 0.0) v += be * load_elem(C, Ctype, idx);  // beta = 0: C is not read
      store_elem(C, Ctype, idx, v);
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// The compiler's access instrumentation (-fsanitize=thread on the emulated sources) lands here.
// Only accesses made while a kernel's own code runs are checked; the rest is the host side.
// ---------------------------------------------------------------------------------------------

#if !UDAT_EMU_ASAN  // the AddressSanitizer build has no access hooks (and GCC declares these)
namespace {
using udat::emu::t_checking;
inline void hook(const void* p, size_t n, int kind, bool natural) {
  if (__builtin_expect(t_checking, 0)) {
    t_checking = false;
    udat::emu::access(p, n, kind, natural);
    t_checking = true;
  }
}
}  // namespace

extern "C" {
#define UDAT_EMU_HOOKS(N)                                                                      \
  void __tsan_read##N(void* p) { hook(p, N, 0, true); }                                        \
  void __tsan_write##N(void* p) { hook(p, N, 1, true); }                                       \
  void __tsan_unaligned_read##N(void* p) { hook(p, N, 0, false); }                             \
  void __tsan_unaligned_write##N(void* p) { hook(p, N, 1, false); }                            \
  void __tsan_volatile_read##N(void* p) { hook(p, N, 0, true); }                               \
  void __tsan_volatile_write##N(void* p) { hook(p, N, 1, true); }                              \
  void __tsan_unaligned_volatile_read##N(void* p) { hook(p, N, 0, false); }                    \
  void __tsan_unaligned_volatile_write##N(void* p) { hook(p, N, 1, false); }
UDAT_EMU_HOOKS(1)
UDAT_EMU_HOOKS(2)
UDAT_EMU_HOOKS(4)
UDAT_EMU_HOOKS(8)
UDAT_EMU_HOOKS(16)
#undef UDAT_EMU_HOOKS
void __tsan_read_range(void* p, unsigned long n) { hook(p, n, 0, false); }
void __tsan_write_range(void* p, unsigned long n) { hook(p, n, 1, false); }
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_ignore_thread_begin() {}
void __tsan_ignore_thread_end() {}
void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  hook(s, n, 0, false);
  hook(d, n, 1, false);
  return std::memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  hook(s, n, 0, false);
  hook(d, n, 1, false);
  return std::memmove(d, s, n);
}
void* __tsan_memset(void* d, int c, unsigned long n) {
  hook(d, n, 1, false);
  return std::memset(d, c, n);
}

// Atomics of the host code compiled alongside (reference counts and the like): performed as
// asked, unchecked. The emulated kernels' own atomics go through udat::emu::atomic instead.
#define UDAT_EMU_ATOMICS(N, T)                                                                  \
  T __tsan_atomic##N##_load(const volatile T* a, int mo) {                                     \
    (void)mo;                                                                                  \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                               \
  }                                                                                            \
  void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                     \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                            \
  T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                            \
  T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                            \
  T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                            \
  T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) {                                     \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                            \
  T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) {                                    \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                            \
  T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) {                                   \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                            \
  int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {         \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);    \
  }                                                                                            \
  int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {           \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);     \
  }                                                                                            \
  T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {               \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);          \
    return c;                                                                                  \
  }
UDAT_EMU_ATOMICS(8, unsigned char)
UDAT_EMU_ATOMICS(16, unsigned short)
UDAT_EMU_ATOMICS(32, unsigned int)
UDAT_EMU_ATOMICS(64, unsigned long long)
#undef UDAT_EMU_ATOMICS
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
}
#endif  // !UDAT_EMU_ASAN
