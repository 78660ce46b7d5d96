// Fused Top-K encoder for CPU: tiled GEMM with bias + ReLU + top-k selection applied while each tile is in cache.
//
// One kernel serves both ``topk_encode`` (one SAE) and ``topk_encode_grouped`` (several SAEs stacked along the
// latent axis, each with its own k, plus an optional AuxK selection among masked latents per SAE): ``topk_encode``
// is the one-segment, no-aux case of the grouped plan.
//
// The latent axis is cut into *segments* (one per SAE). Work is split into items = (row block) x (unit), a unit
// being a contiguous latent range: either a chunk of one segment (a segment is split into several chunks only for
// small B, so that all threads have work) or a pack of consecutive whole segments that together fit one tile.
// Per item, the unit is walked in blocks of ``latent_block`` latents; per block the tile
// (x - b_dec)[rows] @ W_enc[latents].T is computed with one single-threaded BLAS call (at::mm_out inside the
// parallel region), then scanned row by row, each row-segment piece of the tile against that segment's selection:
//   * a selection keeps a running threshold ``thr`` (its current k-th best value, 0 at the start: ReLU) and a
//     candidate buffer of capacity C >= 2k;
//   * the tile is scanned 64 entries at a time with one vector compare per 16 (tile + b_enc > thr); almost all
//     groups are rejected by a single mask test;
//   * accepted entries are appended; a full buffer is compacted with nth_element to its k best, raising thr.
// With an aux mask, every row-segment also keeps a second selection (k_aux) scanned over the same tile with the bias
// b_aux = (mask ? b_enc : -inf): unmasked latents never pass, and blocks without masked latents are skipped — so the
// AuxK selection costs a second scan of the cached tile, never a second GEMM.
// Whole-segment pieces write their survivors straight to the outputs; chunks of a split segment leave partial top-k
// lists that are merged at the end. The B x S pre-activation matrix is never materialised: per thread only a
// row_block x latent_block tile exists.
#include "common.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace dlmscope {
namespace cpu {
namespace {

template <typename T>
struct Cand {
  T v;
  int64_t id;
};

template <typename T>
struct GreaterCand {
  bool operator()(const Cand<T>& a, const Cand<T>& b) const { return a.v > b.v || (a.v == b.v && a.id < b.id); }
};

// Selection state of one row: buffer of capacity ``cap`` (>= 2k), running threshold.
template <typename T>
struct RowSel {
  Cand<T>* buf;
  int64_t cnt;
  T thr;
};

template <typename T>
inline void compact(RowSel<T>& s, int64_t k) {
  std::nth_element(s.buf, s.buf + (k - 1), s.buf + s.cnt, GreaterCand<T>());
  s.thr = s.buf[k - 1].v;
  s.cnt = k;
}

template <typename T>
inline void push(RowSel<T>& s, T v, int64_t id, int64_t k, int64_t cap) {
  if (!(v > s.thr)) return;  // thr may have risen within the current group
  s.buf[s.cnt].v = v;
  s.buf[s.cnt].id = id;
  if (++s.cnt == cap) compact(s, k);
}

// Scan one tile row: values t[0..N) + bias[0..N) with latent ids id0 + c.
template <typename T>
inline void scan_row_generic(RowSel<T>& s, const T* t, const T* bias, int64_t N, int64_t id0, int64_t k,
                             int64_t cap) {
  constexpr int64_t G = 16;
  int64_t c = 0;
  for (; c + G <= N; c += G) {
    const T thr = s.thr;
    bool any = false;
    for (int64_t i = 0; i < G; ++i) any |= (t[c + i] + bias[c + i]) > thr;
    if (any) {
      for (int64_t i = 0; i < G; ++i) push(s, t[c + i] + bias[c + i], id0 + c + i, k, cap);
    }
  }
  for (; c < N; ++c) push(s, t[c] + bias[c], id0 + c, k, cap);
}

template <typename T>
inline void scan_row(RowSel<T>& s, const T* t, const T* bias, int64_t N, int64_t id0, int64_t k, int64_t cap) {
  scan_row_generic(s, t, bias, N, id0, k, cap);
}

#if defined(__AVX512F__)
template <>
inline void scan_row<float>(RowSel<float>& s, const float* t, const float* bias, int64_t N, int64_t id0, int64_t k,
                            int64_t cap) {
  int64_t c = 0;
  __m512 vt = _mm512_set1_ps(s.thr);
  alignas(64) float tmp[64];
  for (; c + 64 <= N; c += 64) {
    const __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(t + c), _mm512_loadu_ps(bias + c));
    const __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(t + c + 16), _mm512_loadu_ps(bias + c + 16));
    const __m512 v2 = _mm512_add_ps(_mm512_loadu_ps(t + c + 32), _mm512_loadu_ps(bias + c + 32));
    const __m512 v3 = _mm512_add_ps(_mm512_loadu_ps(t + c + 48), _mm512_loadu_ps(bias + c + 48));
    const __m512 mx = _mm512_max_ps(_mm512_max_ps(v0, v1), _mm512_max_ps(v2, v3));
    if (__builtin_expect(_mm512_cmp_ps_mask(mx, vt, _CMP_GT_OQ) == 0, 1)) continue;
    uint64_t m = (uint64_t)_mm512_cmp_ps_mask(v0, vt, _CMP_GT_OQ) |
                 ((uint64_t)_mm512_cmp_ps_mask(v1, vt, _CMP_GT_OQ) << 16) |
                 ((uint64_t)_mm512_cmp_ps_mask(v2, vt, _CMP_GT_OQ) << 32) |
                 ((uint64_t)_mm512_cmp_ps_mask(v3, vt, _CMP_GT_OQ) << 48);
    _mm512_store_ps(tmp, v0);
    _mm512_store_ps(tmp + 16, v1);
    _mm512_store_ps(tmp + 32, v2);
    _mm512_store_ps(tmp + 48, v3);
    while (m) {
      const int bit = __builtin_ctzll(m);
      m &= m - 1;
      push(s, tmp[bit], id0 + c + bit, k, cap);
    }
    vt = _mm512_set1_ps(s.thr);
  }
  for (; c < N; ++c) push(s, t[c] + bias[c], id0 + c, k, cap);
}

#endif

#if defined(__AVX512F__)
// float fast path: candidates packed as uint64 keys (float bits << 32 | latent id). Every candidate is > thr >= 0,
// and positive IEEE floats order like their bit patterns, so keys order like values. Accepted lanes are appended
// branch-free with a register compress + full-width store (memory-destination compress is microcoded on Zen 4),
// which matters when many entries pass (large k). The row buffer needs kKeySlack entries beyond ``cap``.
constexpr int64_t kKeySlack = 64 + 8;

inline float key_value(uint64_t key) {
  const uint32_t bits = uint32_t(key >> 32);
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline void compact_keys(uint64_t* buf, int64_t& cnt, float& thr, int64_t k) {
  std::nth_element(buf, buf + (k - 1), buf + cnt, std::greater<uint64_t>());
  thr = key_value(buf[k - 1]);
  cnt = k;
}

inline void append_keys(uint64_t* buf, int64_t& cnt, __m512 v, __mmask16 m, uint32_t id0) {
  const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32((int)id0),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i bits = _mm512_castps_si512(v);
  const __mmask8 mlo = (__mmask8)(m & 0xFF), mhi = (__mmask8)(m >> 8);
  if (mlo) {
    const __m512i key = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(bits)), 32),
                                        _mm512_cvtepu32_epi64(_mm512_castsi512_si256(ids)));
    _mm512_storeu_si512(buf + cnt, _mm512_maskz_compress_epi64(mlo, key));
    cnt += __builtin_popcount(mlo);
  }
  if (mhi) {
    const __m512i key =
        _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(bits, 1)), 32),
                        _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(ids, 1)));
    _mm512_storeu_si512(buf + cnt, _mm512_maskz_compress_epi64(mhi, key));
    cnt += __builtin_popcount(mhi);
  }
}

inline void scan_row_keys(uint64_t* buf, int64_t& cnt, float& thr, const float* t, const float* bias, int64_t N,
                          int64_t id0, int64_t k, int64_t cap) {
  int64_t c = 0;
  __m512 vt = _mm512_set1_ps(thr);
  for (; c + 64 <= N; c += 64) {
    const __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(t + c), _mm512_loadu_ps(bias + c));
    const __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(t + c + 16), _mm512_loadu_ps(bias + c + 16));
    const __m512 v2 = _mm512_add_ps(_mm512_loadu_ps(t + c + 32), _mm512_loadu_ps(bias + c + 32));
    const __m512 v3 = _mm512_add_ps(_mm512_loadu_ps(t + c + 48), _mm512_loadu_ps(bias + c + 48));
    const __m512 mx = _mm512_max_ps(_mm512_max_ps(v0, v1), _mm512_max_ps(v2, v3));
    if (__builtin_expect(_mm512_cmp_ps_mask(mx, vt, _CMP_GT_OQ) == 0, 1)) continue;
    append_keys(buf, cnt, v0, _mm512_cmp_ps_mask(v0, vt, _CMP_GT_OQ), uint32_t(id0 + c));
    append_keys(buf, cnt, v1, _mm512_cmp_ps_mask(v1, vt, _CMP_GT_OQ), uint32_t(id0 + c + 16));
    append_keys(buf, cnt, v2, _mm512_cmp_ps_mask(v2, vt, _CMP_GT_OQ), uint32_t(id0 + c + 32));
    append_keys(buf, cnt, v3, _mm512_cmp_ps_mask(v3, vt, _CMP_GT_OQ), uint32_t(id0 + c + 48));
    if (cnt >= cap) {
      compact_keys(buf, cnt, thr, k);
      vt = _mm512_set1_ps(thr);
    }
  }
  for (; c < N; c += 16) {  // tail: masked loads
    const int64_t rem = std::min<int64_t>(16, N - c);
    const __mmask16 lm = (__mmask16)((1u << rem) - 1u);
    const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(lm, t + c), _mm512_maskz_loadu_ps(lm, bias + c));
    append_keys(buf, cnt, v, (__mmask16)(_mm512_cmp_ps_mask(v, vt, _CMP_GT_OQ) & lm), uint32_t(id0 + c));
    if (cnt >= cap) {
      compact_keys(buf, cnt, thr, k);
      vt = _mm512_set1_ps(thr);
    }
  }
}
#endif

// ---- selection paths -----------------------------------------------------------------------------------------------
// A path owns the per-row selection state of one (row, selection) pair and knows how to scan a tile row into it and
// how to hand out its final (<= k) survivors as Cand<T>.

template <typename T>
struct CandPath {  // generic: (value, id) pairs, scalar / per-type vector reject test
  using Elem = Cand<T>;
  using State = RowSel<T>;
  static constexpr int64_t kSlack = 0;
  static State make(Elem* buf) { return State{buf, 0, T(0)}; }
  static void scan(State& s, const T* t, const T* bias, int64_t N, int64_t id0, int64_t k, int64_t cap) {
    scan_row<T>(s, t, bias, N, id0, k, cap);
  }
  static const Cand<T>* survivors(State& s, int64_t k, Cand<T>* /*scratch*/, int64_t& cnt) {
    if (s.cnt > k) compact(s, k);
    cnt = s.cnt;
    return s.buf;
  }
};

#if defined(__AVX512F__)
struct RowKeys {
  uint64_t* buf;
  int64_t cnt;
  float thr;
};

struct KeyPath {  // float + AVX-512: packed uint64 keys, branch-free compress-append
  using Elem = uint64_t;
  using State = RowKeys;
  static constexpr int64_t kSlack = kKeySlack;
  static State make(Elem* buf) { return State{buf, 0, 0.f}; }
  static void scan(State& s, const float* t, const float* bias, int64_t N, int64_t id0, int64_t k, int64_t cap) {
    scan_row_keys(s.buf, s.cnt, s.thr, t, bias, N, id0, k, cap);
  }
  static const Cand<float>* survivors(State& s, int64_t k, Cand<float>* scratch, int64_t& cnt) {
    if (s.cnt > k) compact_keys(s.buf, s.cnt, s.thr, k);
    for (int64_t j = 0; j < s.cnt; ++j) {
      scratch[j].v = key_value(s.buf[j]);
      scratch[j].id = int64_t(s.buf[j] & 0xFFFFFFFFu);
    }
    cnt = s.cnt;
    return scratch;
  }
};
#endif

// Write a row's survivors (in selection order: rows are not sorted — sorting 4096 rows of k=820 costs ~10% of the
// GEMM), then pad with zeros at the smallest ids >= ``base`` not selected (base = the segment's first latent).
template <typename T>
void write_row(const Cand<T>* buf, int64_t cnt, int64_t k, int64_t base, T* vout, int64_t* iout,
               std::vector<int64_t>& scratch) {
  for (int64_t j = 0; j < cnt; ++j) {
    vout[j] = buf[j].v;
    iout[j] = buf[j].id;
  }
  if (cnt < k) {
    scratch.assign(iout, iout + cnt);
    std::sort(scratch.begin(), scratch.end());
    int64_t next = base, p = 0;
    for (int64_t j = cnt; j < k; ++j) {
      while (p < (int64_t)scratch.size() && scratch[p] == next) {
        ++p;
        ++next;
      }
      vout[j] = T(0);
      iout[j] = next++;
    }
  }
}

// ---- the plan -------------------------------------------------------------------------------------------------------
struct Segment {
  int64_t start, size, k, ka;  // ka = 0: no aux selection for this segment
  int64_t col, acol;           // first output column of its block in values / aux_values
};

struct Piece {          // the part of one segment inside one unit
  int64_t seg, a, b;    // latent range [a, b)
  int64_t slot;         // its main selection's slot in the unit (aux, if any, is slot + 1)
  int64_t part;         // -1: whole segment (written directly); else offset of its partial lists (see Plan)
  int64_t pcnt;         // offset of its partial counts
};

struct Unit {
  int64_t a, b;         // latent range
  int64_t p0, p1;       // pieces [p0, p1)
  int64_t nslots;       // selections per row
  int64_t stride;       // state elements per row
};

struct Plan {
  std::vector<Segment> segs;
  std::vector<Piece> pieces;
  std::vector<Unit> units;
  std::vector<int64_t> slot_off, slot_cap, slot_k;  // per slot of every unit, indexed by unit-relative slot + base
  std::vector<int64_t> unit_slot0;                  // first entry of each unit in the slot arrays
  std::vector<std::vector<int64_t>> split_pieces;   // per segment: its chunk pieces (empty: not split)
  int64_t max_slots = 0, max_stride = 0, max_k = 0;
  int64_t part_elems = 0, part_cnts = 0;            // partial storage: Cand elements, counts
};

inline int64_t cap_for(int64_t k) { return std::max<int64_t>(2 * k, k + 32); }

// Units, pieces, slots. ``slack`` = extra buffer elements a selection path needs beyond its capacity.
Plan make_plan(const std::vector<int64_t>& ks, const std::vector<int64_t>& sizes, const std::vector<int64_t>& kas,
               int64_t B, int64_t R, int64_t NB, int64_t slack) {
  Plan p;
  const int64_t G = (int64_t)ks.size();
  int64_t start = 0, col = 0, acol = 0, total = 0;
  for (int64_t g = 0; g < G; ++g) {
    p.segs.push_back(Segment{start, sizes[g], ks[g], kas[g], col, acol});
    start += sizes[g];
    col += ks[g];
    acol += kas[g];
    total += sizes[g];
  }
  p.split_pieces.resize(G);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t row_blocks = (B + R - 1) / R;
  // Small B: split segments into chunks so that every thread has an item (each chunk >= max(k, 256) latents).
  // (Small B is memory-bound on reading W_enc: splitting latents lets each thread stream only its share of it.)
  int64_t chunk_target = 0;  // 0: no splitting
  if (row_blocks < nthreads) {
    const int64_t C = (nthreads + row_blocks - 1) / row_blocks;
    chunk_target = (total + C - 1) / C;
  }
  auto add_piece = [&](int64_t g, int64_t a, int64_t b, bool split) {
    Unit& u = p.units.back();
    const Segment& s = p.segs[g];
    Piece pc{g, a, b, u.nslots, -1, -1};
    for (int64_t kk : {s.k, s.ka}) {
      if (kk == 0) continue;  // (only ka can be 0)
      p.slot_off.push_back(u.stride);
      p.slot_cap.push_back(cap_for(kk));
      p.slot_k.push_back(kk);
      u.stride += cap_for(kk) + slack;
      u.nslots += 1;
    }
    if (split) {
      pc.part = p.part_elems;
      pc.pcnt = p.part_cnts;
      p.part_elems += B * (s.k + s.ka);
      p.part_cnts += B * 2;
      p.split_pieces[g].push_back((int64_t)p.pieces.size());
    }
    p.pieces.push_back(pc);
    u.p1 = (int64_t)p.pieces.size();
    u.b = b;
  };
  auto new_unit = [&](int64_t a) {
    p.unit_slot0.push_back((int64_t)p.slot_off.size());
    p.units.push_back(Unit{a, a, (int64_t)p.pieces.size(), (int64_t)p.pieces.size(), 0, 0});
  };
  bool pack_open = false;  // the last unit is a pack of small segments that may take another
  for (int64_t g = 0; g < G; ++g) {
    const Segment& s = p.segs[g];
    if (s.size < NB) {  // small segment: whole, packed with its neighbours into one tile
      if (!(pack_open && p.units.back().b - p.units.back().a + s.size <= NB)) new_unit(s.start);
      add_piece(g, s.start, s.start + s.size, false);
      pack_open = true;
      continue;
    }
    pack_open = false;
    int64_t nch = 1;
    if (chunk_target > 0) {
      nch = std::min<int64_t>((s.size + chunk_target - 1) / chunk_target,
                              std::max<int64_t>(1, s.size / std::max<int64_t>(s.k, 256)));
      nch = std::max<int64_t>(nch, 1);
    }
    const int64_t len = (s.size + nch - 1) / nch;
    for (int64_t a = s.start; a < s.start + s.size; a += len) {
      new_unit(a);
      add_piece(g, a, std::min(s.start + s.size, a + len), nch > 1);
    }
  }
  for (const Unit& u : p.units) {
    p.max_slots = std::max(p.max_slots, u.nslots);
    p.max_stride = std::max(p.max_stride, u.stride);
  }
  for (const Segment& s : p.segs) p.max_k = std::max({p.max_k, s.k, s.ka});
  return p;
}

template <typename T, typename Path>
void encode_impl(const at::Tensor& xc, const at::Tensor& W, const T* bias, const T* bias_aux,
                 const int64_t* mask_prefix, const Plan& plan, int64_t R, int64_t NB, at::Tensor& values,
                 at::Tensor& indices, at::Tensor& aux_values, at::Tensor& aux_indices) {
  using Elem = typename Path::Elem;
  using State = typename Path::State;
  const int64_t B = xc.size(0), d = xc.size(1);
  const int64_t K = values.size(1), KA = aux_values.size(1);
  const T* xp = xc.data_ptr<T>();
  const T* wp = W.data_ptr<T>();
  T* vp = values.data_ptr<T>();
  int64_t* ip = indices.data_ptr<int64_t>();
  T* avp = KA > 0 ? aux_values.data_ptr<T>() : nullptr;
  int64_t* aip = KA > 0 ? aux_indices.data_ptr<int64_t>() : nullptr;

  const int64_t U = (int64_t)plan.units.size();
  const int64_t items = ((B + R - 1) / R) * U;
  std::vector<Cand<T>> partial((size_t)plan.part_elems);
  std::vector<int64_t> partial_cnt((size_t)plan.part_cnts);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tile((size_t)R * NB);
    std::vector<Elem> bufs((size_t)R * plan.max_stride);
    std::vector<State> sel((size_t)R * plan.max_slots);
    std::vector<Cand<T>> surv((size_t)plan.max_k);
    std::vector<int64_t> scratch;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t rb = it / U;
      const Unit& u = plan.units[it % U];
      const int64_t s0 = plan.unit_slot0[it % U];
      const int64_t r0 = rb * R, rows = std::min(R, B - r0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t s = 0; s < u.nslots; ++s)
          sel[r * plan.max_slots + s] = Path::make(bufs.data() + r * u.stride + plan.slot_off[s0 + s]);
      at::Tensor xblk = at::from_blob(const_cast<T*>(xp + r0 * d), {rows, d}, xc.options());
      for (int64_t n0 = u.a; n0 < u.b; n0 += NB) {
        const int64_t N = std::min(NB, u.b - n0);
        at::Tensor wblk = at::from_blob(const_cast<T*>(wp + n0 * d), {N, d}, W.options());
        at::Tensor t = at::from_blob(tile.data(), {rows, N}, xc.options());
        at::mm_out(t, xblk, wblk.t());
        for (int64_t pi = u.p0; pi < u.p1; ++pi) {
          const Piece& pc = plan.pieces[pi];
          const int64_t c0 = std::max(pc.a, n0), c1 = std::min(pc.b, n0 + N);
          if (c0 >= c1) continue;
          const Segment& sg = plan.segs[pc.seg];
          const bool aux = sg.ka > 0 && mask_prefix[c1] > mask_prefix[c0];
          const int64_t cap = plan.slot_cap[s0 + pc.slot];
          const int64_t acap = sg.ka > 0 ? plan.slot_cap[s0 + pc.slot + 1] : 0;
          for (int64_t r = 0; r < rows; ++r) {
            const T* trow = tile.data() + r * N + (c0 - n0);
            State* st = sel.data() + r * plan.max_slots + pc.slot;
            Path::scan(st[0], trow, bias + c0, c1 - c0, c0, sg.k, cap);
            if (aux) Path::scan(st[1], trow, bias_aux + c0, c1 - c0, c0, sg.ka, acap);
          }
        }
      }
      for (int64_t pi = u.p0; pi < u.p1; ++pi) {
        const Piece& pc = plan.pieces[pi];
        const Segment& sg = plan.segs[pc.seg];
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t b = r0 + r;
          State* st = sel.data() + r * plan.max_slots + pc.slot;
          for (int64_t which = 0; which < (sg.ka > 0 ? 2 : 1); ++which) {
            const int64_t kk = which == 0 ? sg.k : sg.ka;
            int64_t cnt = 0;
            const Cand<T>* sv = Path::survivors(st[which], kk, surv.data(), cnt);
            if (pc.part < 0) {
              if (which == 0)
                write_row(sv, cnt, kk, sg.start, vp + b * K + sg.col, ip + b * K + sg.col, scratch);
              else
                write_row(sv, cnt, kk, sg.start, avp + b * KA + sg.acol, aip + b * KA + sg.acol, scratch);
            } else {
              std::copy(sv, sv + cnt, partial.data() + pc.part + b * (sg.k + sg.ka) + (which == 0 ? 0 : sg.k));
              partial_cnt[pc.pcnt + b * 2 + which] = cnt;
            }
          }
        }
      }
    }
  });

  if (plan.part_elems > 0) {  // merge the chunks of split segments
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      std::vector<Cand<T>> merged;
      std::vector<int64_t> scratch;
      for (int64_t b = begin; b < end; ++b) {
        for (size_t g = 0; g < plan.segs.size(); ++g) {
          const std::vector<int64_t>& sp = plan.split_pieces[g];
          if (sp.empty()) continue;
          const Segment& sg = plan.segs[g];
          for (int64_t which = 0; which < (sg.ka > 0 ? 2 : 1); ++which) {
            const int64_t kk = which == 0 ? sg.k : sg.ka;
            merged.clear();
            for (int64_t pi : sp) {
              const Piece& pc = plan.pieces[pi];
              const Cand<T>* src = partial.data() + pc.part + b * (sg.k + sg.ka) + (which == 0 ? 0 : sg.k);
              merged.insert(merged.end(), src, src + partial_cnt[pc.pcnt + b * 2 + which]);
            }
            int64_t cnt = (int64_t)merged.size();
            if (cnt > kk) {
              std::nth_element(merged.begin(), merged.begin() + (kk - 1), merged.end(), GreaterCand<T>());
              cnt = kk;
            }
            if (which == 0)
              write_row(merged.data(), cnt, kk, sg.start, vp + b * K + sg.col, ip + b * K + sg.col, scratch);
            else
              write_row(merged.data(), cnt, kk, sg.start, avp + b * KA + sg.acol, aip + b * KA + sg.acol, scratch);
          }
        }
      }
    });
  }
}

// The aux bias (b_enc where masked, -inf elsewhere), the plan, and the selection path for T.
template <typename T>
void run_encode(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc,
                const std::optional<at::Tensor>& aux_mask, const std::vector<int64_t>& mask_prefix,
                const std::vector<int64_t>& ks, const std::vector<int64_t>& sizes, const std::vector<int64_t>& kas,
                int64_t R, int64_t NB, at::Tensor& values, at::Tensor& indices, at::Tensor& aux_values,
                at::Tensor& aux_indices) {
  const int64_t B = xc.size(0), n = W_enc.size(0);
  const T* bp = b_enc.data_ptr<T>();
  std::vector<T> bias_aux;
  if (aux_values.size(1) > 0) {
    const bool* mp = aux_mask->data_ptr<bool>();
    bias_aux.resize((size_t)n);
    for (int64_t i = 0; i < n; ++i) bias_aux[i] = mp[i] ? bp[i] : -std::numeric_limits<T>::infinity();
  }
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    const Plan plan = make_plan(ks, sizes, kas, B, R, NB, KeyPath::kSlack);
    encode_impl<float, KeyPath>(xc, W_enc, bp, bias_aux.data(), mask_prefix.data(), plan, R, NB, values, indices,
                                aux_values, aux_indices);
    return;
  }
#endif
  const Plan plan = make_plan(ks, sizes, kas, B, R, NB, CandPath<T>::kSlack);
  encode_impl<T, CandPath<T>>(xc, W_enc, bp, bias_aux.data(), mask_prefix.data(), plan, R, NB, values, indices,
                              aux_values, aux_indices);
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Shared driver: validation, x - b_dec, tile shape, aux bias, dispatch.
Outputs encode_segments(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& b_dec,
                        const std::vector<int64_t>& ks, const std::vector<int64_t>& sizes,
                        const std::optional<at::Tensor>& aux_mask, std::vector<int64_t> kas, int64_t row_block,
                        int64_t latent_block, const char* name) {
  TORCH_CHECK(x.dim() == 2 && W_enc.dim() == 2 && b_enc.dim() == 1 && b_dec.dim() == 1, name, ": bad dims");
  TORCH_CHECK(x.size(1) == W_enc.size(1) && b_enc.size(0) == W_enc.size(0) && b_dec.size(0) == x.size(1), name,
              ": shape mismatch");
  TORCH_CHECK(x.scalar_type() == W_enc.scalar_type() && x.scalar_type() == b_enc.scalar_type() &&
                  x.scalar_type() == b_dec.scalar_type(),
              name, ": dtype mismatch");
  TORCH_CHECK(x.is_contiguous() && W_enc.is_contiguous() && b_enc.is_contiguous() && b_dec.is_contiguous(), name,
              ": inputs must be contiguous");
  const int64_t B = x.size(0), n = W_enc.size(0);
  TORCH_CHECK(n < (int64_t(1) << 31), name, ": the latent count must be < 2^31");
  TORCH_CHECK(!ks.empty() && ks.size() == sizes.size(), name, ": ks and sizes must be non-empty, of equal length");
  const bool has_aux = aux_mask.has_value();
  if (has_aux) {
    TORCH_CHECK(kas.size() == ks.size(), name, ": k_aux must have one entry per segment");
    TORCH_CHECK(aux_mask->scalar_type() == at::kBool && aux_mask->dim() == 1 && aux_mask->size(0) == n &&
                    aux_mask->is_contiguous(),
                name, ": aux_mask must be a contiguous bool tensor [S]");
  } else {
    kas.assign(ks.size(), 0);
  }
  int64_t total = 0, K = 0, KA = 0;
  for (size_t g = 0; g < ks.size(); ++g) {
    TORCH_CHECK(ks[g] >= 1 && ks[g] <= sizes[g], name, ": segment ", g, " needs 1 <= k <= size");
    TORCH_CHECK(kas[g] >= 0 && kas[g] <= sizes[g], name, ": segment ", g, " needs 0 <= k_aux <= size");
    total += sizes[g];
    K += ks[g];
    KA += kas[g];
  }
  TORCH_CHECK(total == n, name, ": sizes must sum to the latent count of W_enc");
  auto values = at::empty({B, K}, x.options());
  auto indices = at::empty({B, K}, x.options().dtype(at::kLong));
  auto aux_values = at::empty({B, KA}, x.options());
  auto aux_indices = at::empty({B, KA}, x.options().dtype(at::kLong));
  if (B == 0) return {values, indices, aux_values, aux_indices};
  at::Tensor xc = empty_output(x.sizes(), x.options());
  at::sub_out(xc, x, b_dec);
  // Tile defaults, tuned at B=4096, d=512, n=16384, k=32 on a 2-core AVX-512 EPYC (1 MiB L2 per core): 256 rows x
  // 512 latents (a 512 KiB fp32 tile) ran at ~0.82x the bare GEMM; 128..512 rows x 512..2048 latents within ~5%.
  int64_t R = row_block;
  if (R <= 0) {
    // Row blocks of <= 256 rows, their count a multiple of the thread count (static split, equal work per thread);
    // fewer than (threads x 64) rows: one block per 64+ rows and latent splits make up the rest (see make_plan).
    const int64_t P = std::max<int64_t>(1, at::get_num_threads());
    int64_t rb = (B + 255) / 256;
    if (B >= P * 64) rb = (rb + P - 1) / P * P;
    R = (B + rb - 1) / rb;
  }
  const int64_t NB = latent_block > 0 ? latent_block : 512;
  // Prefix counts of the aux mask (blocks without masked latents skip the aux scan) and the aux bias.
  std::vector<int64_t> mask_prefix;
  if (KA > 0) {
    mask_prefix.assign((size_t)n + 1, 0);
    const bool* mp = aux_mask->data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i) mask_prefix[i + 1] = mask_prefix[i] + (mp[i] ? 1 : 0);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dlmscope_topk_encode", [&] {
    run_encode<scalar_t>(xc, W_enc, b_enc, aux_mask, mask_prefix, ks, sizes, kas, R, NB, values, indices, aux_values,
                         aux_indices);
  });
  return {values, indices, aux_values, aux_indices};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_encode(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                                               const at::Tensor& b_dec, int64_t k, int64_t row_block,
                                               int64_t latent_block) {
  TORCH_CHECK(W_enc.dim() == 2 && k >= 1 && k <= W_enc.size(0), "topk_encode: need 1 <= k <= n");
  auto out = encode_segments(x, W_enc, b_enc, b_dec, {k}, {W_enc.size(0)}, std::nullopt, {}, row_block, latent_block,
                             "topk_encode");
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_grouped(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& b_dec,
    const std::vector<int64_t>& ks, const std::vector<int64_t>& sizes, const std::optional<at::Tensor>& aux_mask,
    const std::vector<int64_t>& k_aux, int64_t row_block, int64_t latent_block) {
  return encode_segments(x, W_enc, b_enc, b_dec, ks, sizes, aux_mask, k_aux, row_block, latent_block,
                         "topk_encode_grouped");
}

}  // namespace cpu
}  // namespace dlmscope
