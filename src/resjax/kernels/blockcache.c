// libblockcache: large blocks stay mapped between free and the next malloc of the same size.
//
// XLA:CPU takes a program's temporary buffers as one block per execution (1.1 GiB for ResNet-110's
// training step at batch 128) and frees it when the execution ends. glibc gives a block that large
// back to the OS at free, so every step maps it again and faults in every page of it, zeroed by the
// kernel. Loaded with LD_PRELOAD (resjax.malloc does it where `python -m resjax.kernels build` has
// built this), it serves blocks of at least THRESHOLD bytes itself: each is a mapping of its own,
// 2 MiB-aligned and backed by transparent huge pages, and at free it is kept for the next request
// of the same size (within an eighth) instead of unmapped. At most KEEP free blocks are kept, the
// least recently freed going first.
//
// XLA:CPU starts the next execution as soon as the last one's outputs are ready, and frees the
// last one's temporaries a moment later, so the next block is often asked for while the last is
// still held. A request for a size that is in use, with none of it free, waits up to 50 ms
// ($RESJAX_BLOCKCACHE_WAIT_MS) for that block, and a block freed while another of its size is in
// use is unmapped: a training loop keeps one block, not two. The first wait that times out means
// blocks of one size really are in use at once (several executions side by side); from then on
// nothing waits and freed blocks are kept, up to KEEP. Everything under THRESHOLD is glibc's
// malloc, untouched.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

#define THRESHOLD ((size_t)64 << 20)  // glibc's mmap_threshold in resjax.malloc.TUNABLES
#define ALIGN ((size_t)2 << 20)       // one transparent huge page
#define SLOTS 256                     // blocks tracked at once, in use or kept
#define KEEP 4                        // free blocks kept

typedef struct {
  char *p;      // NULL: an empty slot
  size_t len;   // bytes mapped, a multiple of ALIGN
  int used;
  unsigned long freed_at;
} slot_t;

static slot_t slots[SLOTS];
static unsigned long clock_;
static int side_by_side;  // a wait timed out: blocks of one size are in use at once
static long wait_ms = 50;  // for a block of the size asked for, in use; $RESJAX_BLOCKCACHE_WAIT_MS
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t freed = PTHREAD_COND_INITIALIZER;

static void lock(void) { pthread_mutex_lock(&mu); }
static void unlock(void) { pthread_mutex_unlock(&mu); }
static void child_unlock(void) {
  pthread_mutex_init(&mu, NULL);
  pthread_cond_init(&freed, NULL);
}

__attribute__((constructor)) static void init(void) {
  const char *wait = getenv("RESJAX_BLOCKCACHE_WAIT_MS");
  if (wait && *wait) wait_ms = strtol(wait, NULL, 10);
  pthread_atfork(lock, unlock, child_unlock);
}

static char *map_block(size_t len) {
  char *raw = mmap(NULL, len + ALIGN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return NULL;
  char *p = (char *)(((uintptr_t)raw + ALIGN - 1) & ~(uintptr_t)(ALIGN - 1));
  if (p > raw) munmap(raw, (size_t)(p - raw));
  size_t tail = (size_t)((raw + len + ALIGN) - (p + len));
  if (tail) munmap(p + len, tail);
  madvise(p, len, MADV_HUGEPAGE);
  return p;
}

// Whether a kept block of `kept` bytes serves a request that rounds up to `len`.
static int fits(size_t kept, size_t len) { return kept >= len && kept - len <= len / 8; }

static int same_size(size_t a, size_t b) { return fits(a, b) || fits(b, a); }

static void *big_alloc(size_t n) {
  if (n > SIZE_MAX - 2 * ALIGN) {
    errno = ENOMEM;
    return NULL;
  }
  size_t len = (n + ALIGN - 1) & ~(ALIGN - 1);
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += wait_ms / 1000;
  deadline.tv_nsec += wait_ms % 1000 * 1000000L;
  deadline.tv_sec += deadline.tv_nsec / 1000000000L;
  deadline.tv_nsec %= 1000000000L;
  lock();
  int best, empty;
  for (;;) {
    int busy = 0;
    best = empty = -1;
    for (int i = 0; i < SLOTS; i++) {
      if (!slots[i].p) {
        if (empty < 0) empty = i;
      } else if (!slots[i].used && fits(slots[i].len, len) &&
                 (best < 0 || slots[i].len < slots[best].len)) {
        best = i;
      } else if (slots[i].used && same_size(slots[i].len, len)) {
        busy = 1;
      }
    }
    if (best >= 0 || !busy || side_by_side) break;
    if (pthread_cond_timedwait(&freed, &mu, &deadline) == ETIMEDOUT) side_by_side = 1;
  }
  if (best >= 0) {
    slots[best].used = 1;
    char *p = slots[best].p;
    unlock();
    return p;
  }
  if (empty < 0) {  // every slot taken: glibc's mapping, freed by glibc
    unlock();
    return __libc_memalign(ALIGN, n);
  }
  slots[empty] = (slot_t){(char *)-1, len, 1, 0};  // reserved while mapping, outside the lock
  unlock();
  char *p = map_block(len);
  lock();
  if (p) slots[empty].p = p;
  else slots[empty] = (slot_t){0};
  unlock();
  if (!p) errno = ENOMEM;
  return p;
}

// Index of the slot holding the in-use block p, or -1. Caller holds the lock.
static int find(const void *p) {
  if ((uintptr_t)p & (ALIGN - 1)) return -1;
  for (int i = 0; i < SLOTS; i++)
    if (slots[i].p == p && slots[i].used) return i;
  return -1;
}

static int big_free(void *p) {
  if ((uintptr_t)p & (ALIGN - 1)) return 0;  // glibc's: the common case, decided without the lock
  char *drop[KEEP + 1];
  size_t drop_len[KEEP + 1];
  int ndrop = 0;
  lock();
  int i = find(p);
  if (i < 0) {
    unlock();
    return 0;
  }
  int twin = 0, kept = 0;
  for (int j = 0; j < SLOTS; j++) {
    if (j == i || !slots[j].p) continue;
    if (slots[j].used && same_size(slots[j].len, slots[i].len)) twin = 1;
    if (!slots[j].used) kept++;
  }
  if (twin && !side_by_side) {
    drop[ndrop] = slots[i].p;
    drop_len[ndrop++] = slots[i].len;
    slots[i] = (slot_t){0};
  } else {
    slots[i].used = 0;
    slots[i].freed_at = ++clock_;
    for (kept++; kept > KEEP; kept--) {  // unmap the least recently freed beyond KEEP
      int old = -1;
      for (int j = 0; j < SLOTS; j++)
        if (slots[j].p && !slots[j].used && (old < 0 || slots[j].freed_at < slots[old].freed_at))
          old = j;
      drop[ndrop] = slots[old].p;
      drop_len[ndrop++] = slots[old].len;
      slots[old] = (slot_t){0};
    }
  }
  pthread_cond_broadcast(&freed);
  unlock();
  for (int k = 0; k < ndrop; k++) munmap(drop[k], drop_len[k]);
  return 1;
}

static size_t big_size(const void *p) {
  if ((uintptr_t)p & (ALIGN - 1)) return 0;
  lock();
  int i = find(p);
  size_t n = i < 0 ? 0 : slots[i].len;
  unlock();
  return n;
}

void *malloc(size_t n) { return n >= THRESHOLD ? big_alloc(n) : __libc_malloc(n); }

void free(void *p) {
  if (p && !big_free(p)) __libc_free(p);
}

void *calloc(size_t count, size_t size) {
  size_t n;
  if (__builtin_mul_overflow(count, size, &n)) {
    errno = ENOMEM;
    return NULL;
  }
  if (n < THRESHOLD) return __libc_calloc(count, size);
  void *p = big_alloc(n);
  if (p) memset(p, 0, n);  // a kept block holds its last user's bytes
  return p;
}

size_t malloc_usable_size(void *p) {
  static size_t (*glibc)(void *);
  if (!p) return 0;
  size_t n = big_size(p);
  if (n) return n;
  if (!glibc) glibc = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  return glibc(p);
}

void *realloc(void *p, size_t n) {
  size_t old = p ? big_size(p) : 0;
  if (!old && n < THRESHOLD) return __libc_realloc(p, n);
  if (old && n == 0) {
    free(p);
    return NULL;
  }
  void *q = malloc(n);
  if (!q || !p) return q;
  size_t have = old ? old : malloc_usable_size(p);
  memcpy(q, p, have < n ? have : n);
  free(p);
  return q;
}

void *memalign(size_t alignment, size_t n) {
  return n >= THRESHOLD && alignment <= ALIGN ? big_alloc(n) : __libc_memalign(alignment, n);
}

void *aligned_alloc(size_t alignment, size_t n) { return memalign(alignment, n); }

int posix_memalign(void **out, size_t alignment, size_t n) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1))) return EINVAL;
  void *p = memalign(alignment, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
