#include "ehrgate/redaction.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <memory>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "ehrgate/compartment.hpp"

namespace ehrgate::redaction {

namespace {

constexpr size_t kMaxDepth = 128;
constexpr size_t kMaxKeyBytes = 256;  // a longer top-level key is refused

enum class Kind : uint8_t { Object, Array, String, Number, True, False, Null };

// One token of a unit. Strings span their quotes; containers span their brackets.
struct Node {
    uint32_t start;
    uint32_t end;
    uint32_t next;    // index of the first node after this subtree
    uint32_t parent;  // index of the enclosing container, or UINT32_MAX for the root
    Kind kind;
    bool escaped;   // a string containing a backslash escape
    uint8_t flags;  // edits for re-emission (below); in what would be padding
    uint8_t keys;   // objects: which keys the label walk reads it has (below); padding too
};
static_assert(sizeof(Node) == 20);

// The token tape: an array of nodes whose growth stays off the tokenizer's path.
class Tape {
  public:
    Tape() = default;
    Tape(const Tape &) = delete;
    Tape &operator=(const Tape &) = delete;

    size_t size() const { return size_; }
    size_t capacity() const { return capacity_; }
    Node &operator[](size_t i) { return nodes_[i]; }
    const Node &operator[](size_t i) const { return nodes_[i]; }
    void clear() { size_ = 0; }
    void truncate(size_t n) { size_ = std::min(size_, n); }
    void reserve(size_t n) {
        if (n > capacity_) {
            grow(n, n);
        }
    }
    // Growth doubles, but not past `most` nodes (a tape's limit), so that the capacity stays
    // within the engine's memory bound.
    void push_back(const Node &node, size_t most = SIZE_MAX) {
        if (size_ == capacity_) [[unlikely]] {
            grow(size_ + 1, most);
        }
        nodes_[size_++] = node;
    }

  private:
    [[gnu::noinline]] void grow(size_t at_least, size_t most = SIZE_MAX) {
        const size_t capacity =
            std::max(at_least, std::min(std::max(2 * capacity_, size_t{16}), most));
        auto nodes = std::make_unique_for_overwrite<Node[]>(capacity);
        if (size_ > 0) {
            std::memcpy(nodes.get(), nodes_.get(), size_ * sizeof(Node));
        }
        nodes_ = std::move(nodes);
        capacity_ = capacity;
    }

    std::unique_ptr<Node[]> nodes_;
    size_t size_ = 0;
    size_t capacity_ = 0;
};

constexpr uint32_t kNoNode = UINT32_MAX;

// Node::keys, noted as an object's keys are read, so that the label walk visits only the objects
// with a key it reads (`code`, `system`, `extension`), or with an escaped key (which could spell
// one of them).
enum : uint8_t { kHasCode = 1, kHasSystem = 2, kHasExtension = 4, kHasEscapedKey = 8 };

// Node edit flags.
enum : uint8_t {
    kRemoved = 1,
    kDirty = 2,             // something inside changes
    kAppendRedacted = 4,    // meta.security array: append the REDACTED Coding
    kAddSecurity = 8,       // meta object: add "security":[REDACTED]
    kAddMeta = 16,          // resource object: add "meta":{"security":[REDACTED]}
    kSkipIfEmptyArray = 32  // member value arrays that may end up empty
};

constexpr std::string_view kRedactedCoding =
    R"({"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"REDACTED"})";

// Eight bytes at a time (SWAR) where SSE2 is missing or fewer than 16 bytes are left: the lowest
// flagged byte of each mask is exact, which is all the scanners need.
static_assert(std::endian::native == std::endian::little);
constexpr uint64_t kOnes = 0x0101010101010101ULL;
constexpr uint64_t kHigh = 0x8080808080808080ULL;

inline uint64_t load8(const char *p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}
inline uint64_t zero_bytes(uint64_t v) {
    return (v - kOnes) & ~v & kHigh;
}
inline uint64_t bytes_equal(uint64_t v, uint8_t b) {
    return zero_bytes(v ^ (kOnes * b));
}
inline uint64_t bytes_below(uint64_t v, uint8_t n) {
    return (v - kOnes * n) & ~v & kHigh;
}
inline size_t first_flagged(uint64_t mask) {
    return static_cast<size_t>(std::countr_zero(mask)) / 8;
}

// Index of the first '"' or '\\' at or after pos, or size.
inline size_t find_quote_or_backslash(const char *data, size_t pos, size_t size) {
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"');
    const __m128i backslash = _mm_set1_epi8('\\');
    while (pos + 16 <= size) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i *>(data + pos));
        const auto mask = static_cast<unsigned>(_mm_movemask_epi8(
            _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash))));
        if (mask != 0) {
            return pos + static_cast<size_t>(std::countr_zero(mask));
        }
        pos += 16;
    }
#endif
    while (pos + 8 <= size) {
        const uint64_t v = load8(data + pos);
        const uint64_t m = bytes_equal(v, '"') | bytes_equal(v, '\\');
        if (m != 0) {
            return pos + first_flagged(m);
        }
        pos += 8;
    }
    while (pos < size && data[pos] != '"' && data[pos] != '\\') {
        ++pos;
    }
    return pos;
}

// Index of the first byte at or after pos that ends a plain run inside a string ('"', '\\', a
// control character or a non-ASCII byte), or size.
inline size_t skip_plain(const char *data, size_t pos, size_t size) {
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"');
    const __m128i backslash = _mm_set1_epi8('\\');
    const __m128i space = _mm_set1_epi8(0x20);
    while (pos + 16 <= size) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i *>(data + pos));
        // A signed comparison: bytes >= 0x80 are negative, so "below 0x20" flags them too.
        const __m128i stop =
            _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                         _mm_cmplt_epi8(v, space));
        const auto mask = static_cast<unsigned>(_mm_movemask_epi8(stop));
        if (mask != 0) {
            return pos + static_cast<size_t>(std::countr_zero(mask));
        }
        pos += 16;
    }
#endif
    while (pos + 8 <= size) {
        const uint64_t v = load8(data + pos);
        const uint64_t m =
            bytes_equal(v, '"') | bytes_equal(v, '\\') | bytes_below(v, 0x20) | (v & kHigh);
        if (m != 0) {
            return pos + first_flagged(m);
        }
        pos += 8;
    }
    while (pos < size) {
        const auto c = static_cast<unsigned char>(data[pos]);
        if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) {
            break;
        }
        ++pos;
    }
    return pos;
}

inline bool is_ws(char c) {
    // Most bytes are above the blank: one comparison rejects them.
    return static_cast<unsigned char>(c) <= ' ' &&
           (c == ' ' || c == '\n' || c == '\r' || c == '\t');
}

inline bool is_digit(char c) {
    return static_cast<unsigned char>(c - '0') < 10;
}

int hex_value(char c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

// Validates one UTF-8 sequence starting at data[i] (>= 0x80); returns its length or 0.
size_t utf8_sequence(const char *data, size_t size, size_t i) {
    const auto b0 = static_cast<unsigned char>(data[i]);
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        len = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        len = 3;
        if (b0 == 0xE0) {
            lo = 0xA0;
        } else if (b0 == 0xED) {
            hi = 0x9F;  // no surrogates
        }
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        len = 4;
        if (b0 == 0xF0) {
            lo = 0x90;
        } else if (b0 == 0xF4) {
            hi = 0x8F;
        }
    } else {
        return 0;
    }
    if (i + len > size) {
        return 0;
    }
    const auto b1 = static_cast<unsigned char>(data[i + 1]);
    if (b1 < lo || b1 > hi) {
        return 0;
    }
    for (size_t k = 2; k < len; ++k) {
        const auto b = static_cast<unsigned char>(data[i + k]);
        if (b < 0x80 || b > 0xBF) {
            return 0;
        }
    }
    return len;
}

void append_utf8(std::string &out, uint32_t cp) {
    if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
        out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
}

enum class Parse : uint8_t { Ok, Malformed, TooLarge, TooDeep };

std::string_view parse_error(Parse result) {
    switch (result) {
        case Parse::TooLarge:
            return "too-large";
        case Parse::TooDeep:
            return "too-deep";
        default:
            return "malformed-json";
    }
}

// What the tokenizer expects next (after blanks). With the open containers it is all the state
// there is between two tokens, so a tokenization can stop at a token and resume there.
enum class Due : uint8_t {
    Value,
    KeyOrClose,    // after '{'
    ValueOrClose,  // after '['
    Key,           // after ',' in an object
    Colon,
    Separator,  // after a value: ',' or the container's end (or the end of the value read)
};

// Progress::open holds a container's node index, and whether it is an object.
constexpr uint32_t kOpenObject = 1U << 31;
constexpr uint32_t kOpenIndex = kOpenObject - 1;
static_assert(kMaxHeldBytesLimit / sizeof(Node) < kOpenObject);

struct Progress {
    std::array<uint32_t, kMaxDepth> open;  // the open containers (above), innermost last
    uint32_t top = 0;
    Due due = Due::Value;

    void reset() {
        top = 0;
        due = Due::Value;
    }
};

// A strict tokenizer of one JSON value, appending to a flat tape (no per-token allocation).
// Positions are recorded as `pos + bias` (modulo 2^32), so that a value read in place from a
// chunk is recorded where it sits in the unit it belongs to. `max_nodes` bounds the tape's size.
class Tokenizer {
  public:
    Tokenizer(const char *data, size_t size, Tape &tape, size_t max_nodes, uint32_t bias = 0)
        : data_(data), size_(size), tape_(tape), max_nodes_(max_nodes), bias_(bias) {}
    Tokenizer(const Tokenizer &) = delete;
    Tokenizer &operator=(const Tokenizer &) = delete;

    // The value starting exactly at pos, inside `depth` open containers, the innermost `parent`.
    // On Ok, pos is just past it. Anything else leaves partial nodes behind.
    Parse value(size_t &pos, uint32_t parent, size_t depth) {
        Progress progress;
        return run(pos, progress, parent, depth);
    }

    // Tokenizes from `progress` at pos until the value it is in ends (Ok, pos just past it). A
    // failure, whether a fault or the end of the data, leaves pos at the start of the token that
    // failed and `progress` as it was there, with the nodes before that token on the tape: with
    // more data, the tokenization resumes there as if it had never stopped.
    Parse run(size_t &position, Progress &progress, uint32_t parent, size_t depth) {
        // The state in locals: stores to the tape could alias it in memory.
        const char *const data = data_;
        const size_t size = size_;
        size_t pos = position;
        uint32_t *const open = progress.open.data();
        uint32_t top = progress.top;
        Due due = progress.due;
        uint32_t container = top == 0 ? parent : open[top - 1] & kOpenIndex;
        bool in_object = top > 0 && (open[top - 1] & kOpenObject) != 0;
        // Closes the innermost container with the byte at pos.
        auto close_container = [&] {
            ++pos;
            tape_[container].end = static_cast<uint32_t>(pos + bias_);
            tape_[container].next = static_cast<uint32_t>(tape_.size());
            --top;
            if (top > 0) {
                container = open[top - 1] & kOpenIndex;
                in_object = (open[top - 1] & kOpenObject) != 0;
            } else {
                container = parent;
            }
            due = Due::Separator;
        };
        Parse result = Parse::Ok;
        for (;;) {
            if (due == Due::Separator && top == 0) {
                break;
            }
            while (pos < size && is_ws(data[pos])) {
                ++pos;
            }
            if (pos >= size) {
                result = Parse::Malformed;
                break;
            }
            const size_t token = pos;
            const char c = data[pos];
            if (due == Due::Value || due == Due::ValueOrClose) {
                if (c == '{' || c == '[') {
                    if (depth + top >= kMaxDepth) {
                        result = Parse::TooDeep;
                        break;
                    }
                    const auto index = static_cast<uint32_t>(tape_.size());
                    const bool object = c == '{';
                    if (!push(pos, 0, container, object ? Kind::Object : Kind::Array, false)) {
                        result = Parse::TooLarge;
                        break;
                    }
                    open[top++] = index | (object ? kOpenObject : 0);
                    container = index;
                    in_object = object;
                    due = object ? Due::KeyOrClose : Due::ValueOrClose;
                    ++pos;
                    continue;
                }
                if (c == ']' && due == Due::ValueOrClose) {
                    close_container();
                    continue;
                }
                if (c == '"'                    ? !string(pos, container)
                    : (c == '-' || is_digit(c)) ? !number(pos, container, top > 0)
                                                : !literal(pos, container)) {
                    pos = token;
                    result = failure();
                    break;
                }
                due = Due::Separator;
                continue;
            }
            if (due == Due::Separator) {
                if (c == ',') {
                    ++pos;
                    due = in_object ? Due::Key : Due::Value;
                    continue;
                }
                if (c != (in_object ? '}' : ']')) {
                    result = Parse::Malformed;
                    break;
                }
                close_container();
                continue;
            }
            if (due == Due::Colon) {
                if (c != ':') {
                    result = Parse::Malformed;
                    break;
                }
                ++pos;
                due = Due::Value;
                continue;
            }
            // Key or KeyOrClose.
            if (c == '}' && due == Due::KeyOrClose) {
                close_container();
                continue;
            }
            if (c != '"' || !key_string(pos, container)) {
                pos = token;
                result = failure();
                break;
            }
            if (pos < size && data[pos] == ':') {
                ++pos;  // the usual `"key":`, without another round
                due = Due::Value;
            } else {
                due = Due::Colon;
            }
        }
        position = pos;
        progress.top = top;
        progress.due = due;
        return result;
    }

    // A string at pos (a member key or a value). Most are short and plain: one scan, one node.
    bool string(size_t &pos, uint32_t parent) {
        const size_t start = pos;
        pos = skip_plain(data_, pos + 1, size_);
        bool escaped = false;
        if (pos >= size_ || data_[pos] != '"') [[unlikely]] {
            if (!string_rest(pos, escaped)) {
                return false;
            }
        }
        ++pos;
        return push(start, pos, parent, Kind::String, escaped);
    }

    // A member key of `object` at pos: a string, noted in the object's `keys`.
    bool key_string(size_t &pos, uint32_t object) {
        const size_t start = pos;
        if (!string(pos, object)) {
            return false;
        }
        const char *name = data_ + start + 1;
        const size_t length = pos - start - 2;
        uint8_t note = 0;
        if (tape_[tape_.size() - 1].escaped) {
            note = kHasEscapedKey;
        } else if (length == 4 && std::memcmp(name, "code", 4) == 0) {
            note = kHasCode;
        } else if (length == 6 && std::memcmp(name, "system", 6) == 0) {
            note = kHasSystem;
        } else if (length == 9 && std::memcmp(name, "extension", 9) == 0) {
            note = kHasExtension;
        }
        tape_[object].keys |= note;
        return true;
    }

    bool too_large() const { return too_large_; }

  private:
    // From a byte that ends a plain run (an escape, a control or non-ASCII byte, or the end) up
    // to the closing quote, left at pos.
    [[gnu::noinline]] bool string_rest(size_t &pos, bool &escaped) {
        for (;;) {
            pos = skip_plain(data_, pos, size_);
            if (pos >= size_) {
                return false;
            }
            const auto c = static_cast<unsigned char>(data_[pos]);
            if (c == '"') {
                return true;
            }
            if (c == '\\') {
                escaped = true;
                if (pos + 1 >= size_) {
                    return false;
                }
                const char e = data_[pos + 1];
                if (e == 'u') {
                    if (pos + 6 > size_) {
                        return false;
                    }
                    for (size_t k = 2; k < 6; ++k) {
                        if (hex_value(data_[pos + k]) < 0) {
                            return false;
                        }
                    }
                    pos += 6;
                } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' ||
                           e == 'r' || e == 't') {
                    pos += 2;
                } else {
                    return false;
                }
                continue;
            }
            if (c < 0x80) {
                return false;  // a control character
            }
            const size_t len = utf8_sequence(data_, size_, pos);
            if (len == 0) {
                return false;
            }
            pos += len;
        }
    }

    Parse failure() const { return too_large_ ? Parse::TooLarge : Parse::Malformed; }

    bool push(size_t start, size_t end, uint32_t parent, Kind kind, bool escaped) {
        if (tape_.size() >= max_nodes_) {
            too_large_ = true;
            return false;
        }
        const auto index = static_cast<uint32_t>(tape_.size());
        tape_.push_back(
            Node{static_cast<uint32_t>(start + bias_), static_cast<uint32_t>(end + bias_),
                 index + 1, parent, kind, escaped, 0, 0},
            max_nodes_);
        return true;
    }

    // Inside a container (`delimited`), a number running to the end of the data may go on: not
    // a token yet, so the tokenization stops before it.
    bool number(size_t &pos, uint32_t parent, bool delimited) {
        const size_t start = pos;
        auto digit = [&](size_t p) { return p < size_ && is_digit(data_[p]); };
        if (data_[pos] == '-') {
            ++pos;
        }
        if (!digit(pos)) {
            return false;
        }
        if (data_[pos] == '0') {
            ++pos;
        } else {
            while (digit(pos)) {
                ++pos;
            }
        }
        if (pos < size_ && data_[pos] == '.') {
            ++pos;
            if (!digit(pos)) {
                return false;
            }
            while (digit(pos)) {
                ++pos;
            }
        }
        if (pos < size_ && (data_[pos] == 'e' || data_[pos] == 'E')) {
            ++pos;
            if (pos < size_ && (data_[pos] == '+' || data_[pos] == '-')) {
                ++pos;
            }
            if (!digit(pos)) {
                return false;
            }
            while (digit(pos)) {
                ++pos;
            }
        }
        if (delimited && pos == size_) {
            return false;
        }
        return push(start, pos, parent, Kind::Number, false);
    }

    bool literal(size_t &pos, uint32_t parent) {
        const std::string_view rest(data_ + pos, size_ - pos);
        Kind kind;
        size_t len;
        if (rest.starts_with("true")) {
            kind = Kind::True;
            len = 4;
        } else if (rest.starts_with("false")) {
            kind = Kind::False;
            len = 5;
        } else if (rest.starts_with("null")) {
            kind = Kind::Null;
            len = 4;
        } else {
            return false;
        }
        if (!push(pos, pos + len, parent, kind, false)) {
            return false;
        }
        pos += len;
        return true;
    }

    const char *data_;
    size_t size_;
    Tape &tape_;
    size_t max_nodes_;
    size_t bias_;  // not a uint32_t, which stores to the tape could alias
    bool too_large_ = false;
};

enum State : uint8_t {
    kDocStart,
    kMemberStart,
    kKey,
    kColon,
    kValueStart,
    kValue,
    kAfterMember,
    kEntryStart,
    kEntryValue,
    kAfterEntry,
    kDocEnd,
};

enum ValueKind : uint8_t { kContainer, kStringValue, kScalar };

// 1: quote, 2: opening bracket, 3: closing bracket, 0: anything else.
constexpr std::array<uint8_t, 256> kStructure = [] {
    std::array<uint8_t, 256> table{};
    table['"'] = 1;
    table['{'] = 2;
    table['['] = 2;
    table['}'] = 3;
    table[']'] = 3;
    return table;
}();

inline bool scalar_char(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '+' ||
           c == '-' || c == '.';
}

// Grows `out` so that `more` bytes fit without another reallocation, doubling at least.
void make_room(std::string &out, size_t more) {
    if (out.capacity() - out.size() < more) {
        out.reserve(std::max(out.size() + more, 2 * out.capacity()));
    }
}

// Room for the REDACTED markers a re-emitted unit may gain.
constexpr size_t kEditSlack = 2 * kRedactedCoding.size() + 32;
// The most one marker adds: `,"meta":{"security":[` + the Coding + `]}`.
constexpr size_t kMarkerBytes = kRedactedCoding.size() + 32;

// Appends to a string through a cursor: re-emission writes many small pieces, and a
// push_back or append call per piece costs more than the bytes. The string is sized for what
// is expected up front and grows if that was short; it ends at what was written.
class Writer {
  public:
    Writer(std::string &out, size_t expected) : out_(out), size_(out.size()) {
        out_.resize(size_ + expected);
    }
    ~Writer() { out_.resize(size_); }
    Writer(const Writer &) = delete;
    Writer &operator=(const Writer &) = delete;

    void put(char c) {
        if (size_ == out_.size()) [[unlikely]] {
            grow(1);
        }
        out_[size_++] = c;
    }
    void put(std::string_view s) {
        if (out_.size() - size_ < s.size()) [[unlikely]] {
            grow(s.size());
        }
        std::memcpy(out_.data() + size_, s.data(), s.size());
        size_ += s.size();
    }

  private:
    [[gnu::noinline]] void grow(size_t more) {
        out_.resize(std::max(2 * out_.size(), size_ + more));
    }

    std::string &out_;
    size_t size_;
};

// A released Bundle head's buffer is kept up to this size (the next response may use it).
constexpr size_t kKeptHeadBytes = 16 * 1024;

}  // namespace

// The engine's state: the streaming state machine, the unit being judged, its evaluation and
// re-emission. Reused across responses on a thread (see EnginePool), so `start` resets all of
// it but keeps the buffers' capacity.
struct Redactor::Impl {
    // Per response.
    const Config *config = nullptr;
    const Request *request = nullptr;
    Redactor *owner = nullptr;

    // The unit being judged: its text, its token tape (with the edit flags) and scratch space.
    std::string_view text;
    Tape tape;
    std::string scratch;
    std::string scratch2;
    std::vector<uint32_t> found;  // element lists of apply_masks and in_compartment
    std::string_view error;       // set when evaluation meets something it must refuse
    size_t markers = 0;           // REDACTED markers the unit gains

    // Streaming. `held` is "{" + the members before `entry`, comma-separated, tokenized member
    // by member onto the tape as they complete (node 0 is the top-level object); `unit` gathers
    // an entry, or a member after the entries, that a chunk boundary cuts. What a chunk holds
    // whole is tokenized where it is, and an unchanged entry or resource is released from there.
    std::string held;
    std::string unit;
    std::string last_updated;
    std::array<char, kMaxKeyBytes> key{};  // the current top-level key, raw (between the quotes)
    size_t key_size = 0;
    size_t value_offset = 0;  // where the current member's value starts in `held`
    // A gathered value's tokenization, stopped at `resume_at` (in `unit` for an entry, in `held`
    // for a member) at the chunk's end, to resume there once the value is complete.
    Progress progress;
    size_t resume_at = 0;
    uint32_t key_node = 0;  // the current held member's key node
    uint8_t state = kDocStart;
    bool expect_more = false;  // after a ',' another member/element must follow
    bool bundle = false;       // resourceType "Bundle" seen among the held members
    bool streaming = false;    // the Bundle's head has been released
    bool any_member = false;
    bool any_entry = false;
    // Value scanner, for values that a chunk boundary cuts.
    uint32_t depth = 0;
    bool in_string = false;
    bool escape = false;
    uint8_t value_kind = 0;

    Impl() {
        tape.reserve(128);  // a small resource's tape, without a chain of reallocations
    }

    // Does not throw (the constructor's allocations are done).
    void start(const Config &c, const Request &r, Redactor &o) noexcept {
        config = &c;
        request = &r;
        owner = &o;
        text = {};
        tape.clear();
        error = {};
        markers = 0;
        held.clear();
        unit.clear();
        last_updated.clear();
        key_size = 0;
        value_offset = 0;
        progress.reset();
        resume_at = 0;
        key_node = 0;
        state = kDocStart;
        expect_more = bundle = streaming = any_member = any_entry = false;
        depth = 0;
        in_string = escape = false;
        value_kind = 0;
    }

    size_t memory() const {
        return sizeof(*this) + tape.capacity() * sizeof(Node) + scratch.capacity() +
               scratch2.capacity() + found.capacity() * sizeof(uint32_t) + held.capacity() +
               unit.capacity() + last_updated.capacity();
    }

    Counters &counters() { return owner->counters_; }

    bool fail(std::string_view reason) {
        owner->status_ = Status::Error;
        owner->reason_ = reason;
        return false;
    }

    bool withhold(std::string_view reason) {
        owner->status_ = Status::Withheld;
        owner->reason_ = reason;
        return false;
    }

    size_t max_bytes() const { return config->max_held_bytes; }

    void begin_unit(std::string_view unit_text) {
        text = unit_text;
        error = {};
        markers = 0;
    }

    // The tape's size limit while `text_bytes` of text are held: text and tape share the cap.
    size_t node_limit(size_t text_bytes) const {
        return text_bytes >= max_bytes() ? 0 : (max_bytes() - text_bytes) / sizeof(Node);
    }

    // Node i's text.
    std::string_view span(uint32_t i) const {
        return {text.data() + tape[i].start, tape[i].end - tape[i].start};
    }

    // The same while the text is still the caller's: the text may have to be gathered after all,
    // and the tape must leave it room.
    size_t in_place_node_limit(size_t held_bytes) const { return node_limit(held_bytes) / 2; }

    // The raw text between a string node's quotes.
    std::string_view raw(uint32_t i) const {
        const Node &n = tape[i];
        return {text.data() + n.start + 1, n.end - n.start - 2};
    }

    // A string node's value, unescaped into `buffer` when it has escapes.
    std::string_view value(uint32_t i, std::string &buffer) const {
        const Node &n = tape[i];
        const std::string_view r = raw(i);
        if (!n.escaped) {
            return r;
        }
        buffer.clear();
        for (size_t k = 0; k < r.size(); ++k) {
            if (r[k] != '\\') {
                buffer.push_back(r[k]);
                continue;
            }
            const char e = r[++k];
            switch (e) {
                case 'b':
                    buffer.push_back('\b');
                    break;
                case 'f':
                    buffer.push_back('\f');
                    break;
                case 'n':
                    buffer.push_back('\n');
                    break;
                case 'r':
                    buffer.push_back('\r');
                    break;
                case 't':
                    buffer.push_back('\t');
                    break;
                case 'u': {
                    uint32_t cp = 0;
                    for (size_t h = 1; h <= 4; ++h) {
                        cp = cp * 16 + static_cast<uint32_t>(hex_value(r[k + h]));
                    }
                    k += 4;
                    if (cp >= 0xD800 && cp <= 0xDBFF && k + 6 < r.size() + 0 &&
                        r.substr(k + 1, 2) == "\\u") {
                        uint32_t lo = 0;
                        for (size_t h = 3; h <= 6; ++h) {
                            lo = lo * 16 + static_cast<uint32_t>(hex_value(r[k + h]));
                        }
                        if (lo >= 0xDC00 && lo <= 0xDFFF) {
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                            k += 6;
                        }
                    }
                    append_utf8(buffer, cp);
                    break;
                }
                default:
                    buffer.push_back(e);
            }
        }
        return buffer;
    }

    bool key_is(uint32_t node, std::string_view name) {
        if (!tape[node].escaped) {
            return raw(node) == name;
        }
        return value(node, scratch2) == name;
    }

    // The value node of member `name` of object `obj`; kNoNode if absent. Duplicate keys are a
    // parser differential waiting to happen: refused.
    uint32_t member(uint32_t obj, std::string_view name) {
        if (obj == kNoNode || tape[obj].kind != Kind::Object) {
            return kNoNode;
        }
        uint32_t result = kNoNode;
        for (uint32_t k = obj + 1; k < tape[obj].next; k = tape[k + 1].next) {
            if (key_is(k, name)) {
                if (result != kNoNode) {
                    error = "duplicate-key";
                    return kNoNode;
                }
                result = k + 1;
            }
        }
        return result;
    }

    std::string_view string_member(uint32_t obj, std::string_view name, std::string &buffer) {
        const uint32_t v = member(obj, name);
        if (v == kNoNode || tape[v].kind != Kind::String) {
            return {};
        }
        return value(v, buffer);
    }

    bool withheld(std::string_view code) const {
        for (const std::string &label : request->withheld) {
            if (label == code) {
                return true;
            }
        }
        return false;
    }

    // Marks node i and its ancestors up to (excluding) nothing as changed.
    void mark(uint32_t i, uint8_t flag) {
        tape[i].flags |= flag;
        for (uint32_t p = tape[i].parent; p != kNoNode; p = tape[p].parent) {
            if (tape[p].flags & kDirty) {
                break;
            }
            tape[p].flags |= kDirty;
        }
    }

    void remove(uint32_t i) {
        if ((tape[i].flags & kRemoved) == 0) {
            mark(i, kRemoved);
            ++counters().elements_removed;
        }
    }

    // The key node of the member whose value is `v`, or kNoNode for array elements and roots.
    uint32_t key_of(uint32_t v) const {
        const uint32_t p = tape[v].parent;
        if (p == kNoNode || tape[p].kind != Kind::Object) {
            return kNoNode;
        }
        return v - 1;
    }

    void collect(uint32_t node, std::string_view path, std::vector<uint32_t> &out) {
        if (node == kNoNode) {
            return;
        }
        if (tape[node].kind == Kind::Array) {
            for (uint32_t e = node + 1; e < tape[node].next; e = tape[e].next) {
                collect(e, path, out);
            }
            return;
        }
        if (path.empty()) {
            out.push_back(node);
            return;
        }
        const size_t dot = path.find('.');
        collect(member(node, path.substr(0, dot)),
                dot == std::string_view::npos ? "" : path.substr(dot + 1), out);
    }

    bool patient_reference(std::string_view reference) const {
        const std::string_view base = request->server_base;
        if (!base.empty() && reference.starts_with(base) &&
            reference.substr(base.size()).starts_with("/")) {
            reference.remove_prefix(base.size() + 1);
        }
        if (!reference.starts_with("Patient/")) {
            return false;
        }
        reference.remove_prefix(8);
        const size_t slash = reference.find('/');
        if (slash != std::string_view::npos) {
            if (!reference.substr(slash).starts_with("/_history/")) {
                return false;
            }
            reference = reference.substr(0, slash);
        }
        return reference == request->patient_id;
    }

    bool in_compartment(uint32_t resource, std::string_view type) {
        if (type == "Patient") {
            return string_member(resource, "id", scratch) == request->patient_id;
        }
        if (compartment::is_shared_reference_type(type)) {
            return true;
        }
        for (const std::string_view path : compartment::reference_paths(type)) {
            found.clear();
            collect(resource, path, found);
            for (const uint32_t ref : found) {
                if (patient_reference(string_member(ref, "reference", scratch))) {
                    return true;
                }
            }
        }
        return false;
    }

    // Label, inference and inline-label walk over the resource's subtree. Returns true when a
    // withheld label applies to the whole resource.
    bool sensitive(uint32_t resource) {
        const uint32_t end = tape[resource].next;
        for (uint32_t i = resource; i < end; ++i) {
            if (tape[i].kind != Kind::Object || tape[i].keys == 0) {
                continue;  // none of the keys read below
            }
            uint32_t system = kNoNode, code = kNoNode, extension = kNoNode;
            for (uint32_t k = i + 1; k < tape[i].next; k = tape[k + 1].next) {
                const std::string_view name = tape[k].escaped ? value(k, scratch2) : raw(k);
                uint32_t *slot = nullptr;
                // By length first: most keys are none of the three.
                switch (name.size()) {
                    case 4:
                        slot = name == "code" ? &code : nullptr;
                        break;
                    case 6:
                        slot = name == "system" ? &system : nullptr;
                        break;
                    case 9:
                        slot = name == "extension" ? &extension : nullptr;
                        break;
                    default:
                        break;
                }
                if (slot != nullptr) {
                    if (*slot != kNoNode) {
                        error = "duplicate-key";
                        return true;
                    }
                    *slot = k + 1;
                }
            }
            if (code != kNoNode && tape[code].kind == Kind::String) {
                std::string code_buffer;
                const std::string_view code_value = value(code, code_buffer);
                // Any Coding whose code is a withheld label counts: meta.security first of all,
                // but a label is a label wherever the EHR put it.
                const uint32_t parent = tape[i].parent;
                if (parent != kNoNode && tape[parent].kind == Kind::Array) {
                    const uint32_t security_key = key_of(parent);
                    if (security_key != kNoNode && key_is(security_key, "security") &&
                        withheld(code_value)) {
                        return true;
                    }
                }
                if (system != kNoNode && tape[system].kind == Kind::String) {
                    const std::string_view system_value = value(system, scratch);
                    for (const InferenceRule &rule : config->inference) {
                        if (rule.system == system_value &&
                            (rule.prefix ? code_value.starts_with(rule.code)
                                         : code_value == rule.code) &&
                            withheld(rule.label)) {
                            return true;
                        }
                    }
                }
            }
            if (extension != kNoNode && tape[extension].kind == Kind::Array &&
                inline_withheld(extension)) {
                if (i == resource) {
                    return true;
                }
                remove_element(i);
                i = tape[i].next - 1;  // nothing inside a removed element matters
            }
        }
        return false;
    }

    bool inline_withheld(uint32_t extensions) {
        for (uint32_t e = extensions + 1; e < tape[extensions].next; e = tape[e].next) {
            if (string_member(e, "url", scratch) != kInlineLabelUrl) {
                continue;
            }
            const uint32_t coding = member(e, "valueCoding");
            if (withheld(string_member(coding, "code", scratch))) {
                return true;
            }
        }
        return false;
    }

    // Removes an element; for a primitive's `_name` extension object, the value `name` too.
    void remove_element(uint32_t v) {
        remove(v);
        const uint32_t name_key = key_of(v);
        if (name_key == kNoNode) {
            mark_empty_check(tape[v].parent);
            return;
        }
        const std::string_view name =
            tape[name_key].escaped ? value(name_key, scratch2) : raw(name_key);
        if (name.size() > 1 && name[0] == '_') {
            const std::string sibling(name.substr(1));
            const uint32_t other = member(tape[v].parent, sibling);
            if (other != kNoNode) {
                remove(other);
            }
        }
    }

    void mark_empty_check(uint32_t array) {
        if (array != kNoNode && tape[array].kind == Kind::Array) {
            tape[array].flags |= kSkipIfEmptyArray;
        }
    }

    void apply_masks(uint32_t resource, std::string_view type) {
        for (const FieldMask &mask : config->masks) {
            if (mask.resource_type != type) {
                continue;
            }
            found.clear();
            collect(resource, mask.path, found);
            for (const uint32_t v : found) {
                if (!mask.identifier_system.empty() &&
                    string_member(v, "system", scratch) != mask.identifier_system) {
                    continue;
                }
                remove_element(v);
            }
        }
    }

    void add_redacted_marker(uint32_t resource) {
        const uint32_t meta = member(resource, "meta");
        if (meta == kNoNode || tape[meta].kind != Kind::Object) {
            if (meta != kNoNode) {
                error = "malformed-resource";
            }
            mark(resource, kAddMeta);
            ++markers;
            return;
        }
        const uint32_t security = member(meta, "security");
        if (security == kNoNode) {
            mark(meta, kAddSecurity);
            ++markers;
            return;
        }
        if (tape[security].kind != Kind::Array) {
            error = "malformed-resource";
            return;
        }
        for (uint32_t e = security + 1; e < tape[security].next; e = tape[e].next) {
            if ((tape[e].flags & kRemoved) == 0 &&
                string_member(e, "code", scratch) == kRedactedCode &&
                string_member(e, "system", scratch2) == kObligationSystem) {
                return;
            }
        }
        mark(security, kAppendRedacted);
        ++markers;
    }

    enum class Verdict : uint8_t { Keep, DropLabel, DropCompartment };

    Verdict evaluate(uint32_t resource) {
        if (tape[resource].kind != Kind::Object) {
            error = "malformed-resource";
            return Verdict::DropLabel;
        }
        std::string type_buffer;
        const std::string_view type = string_member(resource, "resourceType", type_buffer);
        if (type.empty()) {
            error = "malformed-resource";
            return Verdict::DropLabel;
        }
        if (type == "Bundle") {
            return evaluate_bundle(resource);
        }
        // The compartment first: for a patient token it is the more fundamental refusal.
        if (!request->patient_id.empty() && !in_compartment(resource, type)) {
            return Verdict::DropCompartment;
        }
        const uint64_t removed_before = counters().elements_removed;
        if (sensitive(resource)) {
            counters().elements_removed = removed_before;
            return Verdict::DropLabel;
        }
        apply_masks(resource, type);
        if (counters().elements_removed != removed_before) {
            add_redacted_marker(resource);
            ++counters().resources_masked;
        }
        return Verdict::Keep;
    }

    // A Bundle's own labels apply to all of it; its entries are judged one by one; its total is
    // always dropped (see the header).
    Verdict evaluate_bundle(uint32_t bundle) {
        const uint32_t meta = member(bundle, "meta");
        const uint32_t security = member(meta, "security");
        if (security != kNoNode && tape[security].kind == Kind::Array) {
            for (uint32_t e = security + 1; e < tape[security].next; e = tape[e].next) {
                if (withheld(string_member(e, "code", scratch))) {
                    return Verdict::DropLabel;
                }
            }
        }
        const uint32_t total = member(bundle, "total");
        if (total != kNoNode) {
            mark(total, kRemoved);
        }
        const uint32_t entries = member(bundle, "entry");
        if (entries == kNoNode) {
            return Verdict::Keep;
        }
        if (tape[entries].kind != Kind::Array) {
            error = "malformed-bundle";
            return Verdict::DropLabel;
        }
        for (uint32_t e = entries + 1; e < tape[entries].next; e = tape[e].next) {
            if (!keep_entry(e)) {
                mark(e, kRemoved);
                mark_empty_check(entries);
                ++counters().resources_removed;
            }
        }
        return Verdict::Keep;
    }

    bool keep_entry(uint32_t entry) {
        if (tape[entry].kind != Kind::Object) {
            error = "malformed-bundle";
            return false;
        }
        const uint32_t resource = member(entry, "resource");
        return resource == kNoNode || evaluate(resource) == Verdict::Keep;
    }

    // Appends node i with its edits.
    void emit(uint32_t i, std::string &out) const {
        const Node &n = tape[i];
        if ((n.flags & ~kRemoved & ~kSkipIfEmptyArray) == 0) {
            out.append(text.data() + n.start, n.end - n.start);
            return;
        }
        // Removals only shorten what they touch; the markers are all a unit can gain.
        Writer writer(out, n.end - n.start + markers * kMarkerBytes);
        emit(i, writer);
    }

    void emit(uint32_t i, Writer &out) const {
        const Node &n = tape[i];
        if ((n.flags & ~kRemoved & ~kSkipIfEmptyArray) == 0) {
            out.put(span(i));
            return;
        }
        if (n.kind == Kind::Object) {
            out.put('{');
            bool first = true;
            for (uint32_t k = i + 1; k < n.next; k = tape[k + 1].next) {
                const uint32_t v = k + 1;
                if ((tape[v].flags & kRemoved) || empty_after_edits(v)) {
                    continue;
                }
                if (!first) {
                    out.put(',');
                }
                first = false;
                out.put(span(k));
                out.put(':');
                emit(v, out);
            }
            if (n.flags & kAddSecurity) {
                out.put(first ? "\"security\":[" : ",\"security\":[");
                out.put(kRedactedCoding);
                out.put(']');
                first = false;
            }
            if (n.flags & kAddMeta) {
                out.put(first ? "\"meta\":{\"security\":[" : ",\"meta\":{\"security\":[");
                out.put(kRedactedCoding);
                out.put("]}");
            }
            out.put('}');
            return;
        }
        // Array.
        out.put('[');
        bool first = true;
        for (uint32_t e = i + 1; e < n.next; e = tape[e].next) {
            if (tape[e].flags & kRemoved) {
                continue;
            }
            if (!first) {
                out.put(',');
            }
            first = false;
            emit(e, out);
        }
        if (n.flags & kAppendRedacted) {
            if (!first) {
                out.put(',');
            }
            out.put(kRedactedCoding);
        }
        out.put(']');
    }

    // FHIR forbids empty arrays: an array emptied by removals goes with its member.
    bool empty_after_edits(uint32_t v) const {
        if ((tape[v].flags & kSkipIfEmptyArray) == 0 || (tape[v].flags & kAppendRedacted)) {
            return false;
        }
        for (uint32_t e = v + 1; e < tape[v].next; e = tape[e].next) {
            if ((tape[e].flags & kRemoved) == 0) {
                return false;
            }
        }
        return true;
    }

    // ---- Streaming ---------------------------------------------------------------------------

    void feed(std::string_view chunk, std::string &out) {
        size_t pos = 0;
        while (pos < chunk.size() && step(chunk.data(), chunk.size(), pos, out)) {
        }
    }

    // Consumes as much of the chunk from pos as one state allows. False stops (status set).
    bool step(const char *data, size_t size, size_t &pos, std::string &out) {
        auto skip_ws = [&] {
            while (pos < size && is_ws(data[pos])) {
                ++pos;
            }
            return pos < size;
        };
        switch (state) {
            case kDocStart:
                if (!skip_ws()) {
                    return true;
                }
                if (data[pos] != '{') {
                    return fail("malformed-json");
                }
                if (whole_document_likely(data, size, pos) &&
                    read_whole_document(data, size, pos)) {
                    return finish_document(out);
                }
                ++pos;
                held.assign("{");
                tape.clear();
                tape.push_back(Node{0, 0, 0, kNoNode, Kind::Object, false, 0, 0});
                state = kMemberStart;
                return true;
            case kMemberStart:
                if (!skip_ws()) {
                    return true;
                }
                if (data[pos] == '}' && !expect_more) {
                    ++pos;
                    return finish_document(out);
                }
                if (data[pos] != '"') {
                    return fail("malformed-json");
                }
                if (bool result = false; !streaming && read_held_key(data, size, pos, result)) {
                    return result;
                }
                ++pos;
                key_size = 0;
                escape = false;
                state = kKey;
                return true;
            case kKey: {
                const size_t start = pos;
                // No further than one byte past the longest key allowed.
                const size_t window = pos + std::min(size - pos, key.size() - key_size + 1);
                while (pos < window) {
                    const char c = data[pos];
                    if (escape) {
                        escape = false;
                    } else if (c == '\\') {
                        escape = true;
                    } else if (c == '"') {
                        break;
                    }
                    ++pos;
                }
                const size_t n = pos - start;
                if (key_size + n > key.size()) {
                    return fail("malformed-json");
                }
                std::memcpy(key.data() + key_size, data + start, n);
                key_size += n;
                if (pos < window) {
                    ++pos;
                    state = kColon;
                }
                return true;
            }
            case kColon:
                if (!skip_ws()) {
                    return true;
                }
                if (data[pos] != ':') {
                    return fail("malformed-json");
                }
                ++pos;
                state = kValueStart;
                return true;
            case kValueStart: {
                if (!skip_ws()) {
                    return true;
                }
                const std::string_view name(key.data(), key_size);
                if (name == "entry" && bundle && !streaming) {
                    if (data[pos] != '[') {
                        return fail("malformed-bundle");
                    }
                    ++pos;
                    if (!start_entries(out)) {
                        return false;
                    }
                    state = kEntryStart;
                    expect_more = false;
                    return true;
                }
                if (streaming) {
                    if (name == "entry") {
                        return fail("duplicate-key");
                    }
                    // After the entries: held alone as a one-member object, to be judged alone.
                    unit.assign("{\"").append(name).append("\":");
                    begin_gathering(data, pos, unit);
                    state = kValue;
                    return true;
                }
                return start_held_value(data, size, pos);
            }
            case kValue:
            case kEntryValue: {
                const bool to_held = state == kValue && !streaming;
                // The tape as it was before the value (its tokenized part counts once complete).
                const size_t tape_bytes = to_held ? (key_node + 1) * sizeof(Node) : 0;
                const size_t held_bytes = held.size() + unit.size() + tape_bytes;
                // Gathered up to one byte past the cap, however large the chunk.
                const size_t window =
                    pos + std::min(size - pos, max_bytes() - std::min(held_bytes, max_bytes()) + 1);
                const size_t start = pos;
                bool complete = false;
                if (value_kind == kScalar) {
                    while (pos < window && scalar_char(data[pos])) {
                        ++pos;
                    }
                    complete = pos < window;
                } else {
                    complete = scan_value(data, window, pos);
                }
                (to_held ? held : unit).append(data + start, pos - start);
                if (held_bytes + (pos - start) > max_bytes()) {
                    return fail("too-large");
                }
                if (!complete) {
                    return true;
                }
                if (state == kValue) {
                    state = kAfterMember;
                    return streaming ? complete_late_member(out) : complete_gathered_member();
                }
                state = kAfterEntry;
                return complete_gathered_entry(out);
            }
            case kAfterMember:
                if (!skip_ws()) {
                    return true;
                }
                if (data[pos] == ',') {
                    ++pos;
                    expect_more = true;
                    state = kMemberStart;
                    return true;
                }
                if (data[pos] == '}') {
                    ++pos;
                    return finish_document(out);
                }
                return fail("malformed-json");
            case kEntryStart:
                if (!skip_ws()) {
                    return true;
                }
                if (data[pos] == ']' && !expect_more) {
                    ++pos;
                    state = kAfterMember;
                    return true;
                }
                if (data[pos] != '{') {
                    return fail("malformed-bundle");
                }
                return start_entry(data, size, pos, out);
            case kAfterEntry:
                if (!skip_ws()) {
                    return true;
                }
                if (data[pos] == ',') {
                    ++pos;
                    expect_more = true;
                    state = kEntryStart;
                    return true;
                }
                if (data[pos] == ']') {
                    ++pos;
                    if (any_entry) {
                        out.push_back(']');
                    }
                    expect_more = false;
                    state = kAfterMember;
                    return true;
                }
                return fail("malformed-json");
            case kDocEnd:
                if (!skip_ws()) {
                    return true;
                }
                return fail("malformed-json");
            default:
                return fail("internal-error");
        }
    }

    // Prepares to gather a value that starts at pos into `target`, across chunks.
    void begin_gathering(const char *data, size_t &pos, std::string &target) {
        const char c = data[pos];
        depth = 0;
        in_string = false;
        escape = false;
        if (c == '{' || c == '[') {
            value_kind = kContainer;
        } else if (c == '"') {
            value_kind = kStringValue;
            in_string = true;
            target.push_back(c);
            ++pos;
        } else {
            value_kind = kScalar;
        }
    }

    // Finds the end of a gathered string or container value; state kept in locals so the loop
    // does not reload members, written back at the end.
    bool scan_value(const char *data, size_t size, size_t &pos) {
        uint32_t level = depth;
        bool inside = in_string;
        bool escaped = escape;
        const bool string_only = value_kind == kStringValue;
        bool complete = false;
        while (pos < size) {
            if (inside) {
                if (escaped) {
                    escaped = false;
                    ++pos;
                    continue;
                }
                pos = find_quote_or_backslash(data, pos, size);
                if (pos >= size) {
                    break;
                }
                if (data[pos++] == '\\') {
                    escaped = true;
                    continue;
                }
                inside = false;
                if (string_only) {
                    complete = true;
                    break;
                }
                continue;
            }
            const uint8_t kind = kStructure[static_cast<unsigned char>(data[pos++])];
            if (kind == 0) {
                continue;
            }
            if (kind == 1) {
                inside = true;
            } else if (kind == 2) {
                ++level;
            } else if (level == 0 || --level == 0) {
                complete = true;
                break;
            }
        }
        depth = level;
        in_string = inside;
        escape = escaped;
        return complete;
    }

    // A member before the entries: its key joins `held` and the tape; its value is tokenized in
    // place when the chunk holds all of it, else gathered (and tokenized once complete). Both
    // ways give the same text and tape, so every chunk split gives the same result.
    bool start_held_value(const char *data, size_t size, size_t &pos) {
        if (any_member) {
            held.push_back(',');
        }
        const size_t key_offset = held.size();
        held.push_back('"');
        held.append(key.data(), key_size);
        held.append("\":");
        value_offset = held.size();
        key_node = static_cast<uint32_t>(tape.size());
        {
            Tokenizer tokenizer(held.data(), held.size(), tape, node_limit(held.size()));
            size_t p = key_offset;
            if (!tokenizer.key_string(p, 0)) {
                return fail(tokenizer.too_large() ? "too-large" : "malformed-json");
            }
        }
        return read_held_value(data, size, pos);
    }

    // The value of a held member, whose key is in `held` and on the tape, starts at pos: it is
    // tokenized in place, and what the chunk does not hold is gathered into `held` and
    // tokenized from where the tokenizer stopped once complete (complete_gathered_member).
    bool read_held_value(const char *data, size_t size, size_t &pos) {
        const char c = data[pos];
        const bool delimited = c == '{' || c == '[' || c == '"';
        // A value longer than the cap allows is decided by the gathering path.
        const size_t limit = pos + std::min(size - pos, max_bytes());
        progress.reset();
        Tokenizer tokenizer(data, limit, tape, in_place_node_limit(held.size()),
                            static_cast<uint32_t>(value_offset) - static_cast<uint32_t>(pos));
        size_t end = pos;
        if (tokenizer.run(end, progress, 0, 1) == Parse::Ok) {
            // A number or literal ends where its scalar characters end, as when gathered.
            if ((delimited || (end < limit && !scalar_char(data[end]))) &&
                held.size() + (end - pos) + tape.size() * sizeof(Node) <= max_bytes()) {
                held.append(data + pos, end - pos);
                pos = end;
                state = kAfterMember;
                return complete_held_member(std::string_view(key.data(), key_size));
            }
            // A scalar the chunk's end may cut, or a member over the cap: gathered from its
            // start, for the gathering path to judge.
            tape.truncate(key_node + 1);
            progress.reset();
            end = pos;
        }
        held.append(data + pos, end - pos);
        resume_at = held.size();
        pos = end;
        if (progress.top == 0) {
            begin_gathering(data, pos, held);  // nothing of it read yet
        } else {
            // Scanning resumes at a token boundary inside the open containers.
            depth = progress.top;
            in_string = false;
            escape = false;
            value_kind = kContainer;
        }
        state = kValue;
        return true;
    }

    // kMemberStart before the entries, at a key's opening quote: when the chunk holds the key,
    // its colon and the value's first byte, the key is tokenized in place and joins `held` as
    // the byte-by-byte states would put it there (`"key":`), and the value follows
    // (read_held_value); `result` is then the step's. False, with nothing changed, leaves the
    // member to those states: a key cut by the chunk's end, a fault or limit they must judge,
    // or the `entry` that starts streaming.
    bool read_held_key(const char *data, size_t size, size_t &pos, bool &result) {
        const size_t limit = pos + std::min(size - pos, max_bytes());
        const size_t mark = tape.size();
        const size_t key_offset = held.size() + (any_member ? 1 : 0);
        size_t p = pos;
        {
            Tokenizer keys(data, limit, tape, in_place_node_limit(held.size()),
                           static_cast<uint32_t>(key_offset) - static_cast<uint32_t>(pos));
            if (!keys.key_string(p, 0)) {
                tape.truncate(mark);
                return false;
            }
        }
        const size_t key_end = p;
        const std::string_view name(data + pos + 1, key_end - pos - 2);
        if (name.size() > key.size() || (name == "entry" && bundle)) {
            tape.truncate(mark);
            return false;
        }
        while (p < limit && is_ws(data[p])) {
            ++p;
        }
        if (p >= limit || data[p] != ':') {
            tape.truncate(mark);
            return false;
        }
        ++p;
        while (p < limit && is_ws(data[p])) {
            ++p;
        }
        if (p >= limit) {
            tape.truncate(mark);
            return false;
        }
        if (any_member) {
            held.push_back(',');
        }
        held.append(data + pos, key_end - pos).push_back(':');
        std::memcpy(key.data(), name.data(), name.size());
        key_size = name.size();
        key_node = static_cast<uint32_t>(mark);
        value_offset = held.size();
        pos = p;
        result = read_held_value(data, size, pos);
        return true;
    }

    // Whether the chunk likely holds, from pos, a whole compact document that does not stream:
    // it ends with '}', has no blank after the '{' and does not start as a Bundle. Only a
    // guess, to spare the attempt where it would likely be wasted.
    static bool whole_document_likely(const char *data, size_t size, size_t pos) {
        size_t last = size;
        while (last > pos && is_ws(data[last - 1])) {
            --last;
        }
        constexpr std::string_view kBundleStart = R"({"resourceType":"Bundle")";
        return last - pos >= 2 && data[last - 1] == '}' && data[pos + 1] == '"' &&
               std::string_view(data + pos, last - pos).substr(0, kBundleStart.size()) !=
                   kBundleStart;
    }

    // A document the chunk holds whole, from its '{' at pos, read in place: one tokenization,
    // judged and released without a copy. It must come out exactly as member by member (held
    // text and tape alike), so it is taken only when the held text would be these very bytes
    // (nothing between the top-level tokens) and the document would not stream; false, with
    // nothing changed, leaves it to the member states, which also judge every fault and limit.
    bool read_whole_document(const char *data, size_t size, size_t &pos) {
        const size_t limit = pos + std::min(size - pos, max_bytes());
        tape.clear();
        Tokenizer tokenizer(data, limit, tape, in_place_node_limit(0),
                            0 - static_cast<uint32_t>(pos));
        size_t end = pos;
        if (tokenizer.value(end, kNoNode, 0) != Parse::Ok || tape[0].kind != Kind::Object ||
            (end - pos - 1) + tape.size() * sizeof(Node) > max_bytes()) {
            tape.clear();
            return false;
        }
        begin_unit(std::string_view(data + pos, end - pos));
        bool is_bundle = false;
        uint32_t next_start = 1;  // where the next key must start: right after '{' or ','
        for (uint32_t k = 1; k < tape[0].next; k = tape[k + 1].next) {
            const uint32_t v = k + 1;
            const std::string_view name = raw(k);
            if (tape[k].start != next_start || tape[v].start != tape[k].end + 1 ||
                name.size() > key.size() || (name == "entry" && is_bundle)) {
                tape.clear();
                last_updated.clear();
                return false;
            }
            next_start = tape[v].end + 1;
            if (name == "resourceType") {
                is_bundle = tape[v].kind == Kind::String && value(v, scratch) == "Bundle";
            } else if (name == "meta") {
                last_updated.assign(string_member(v, "lastUpdated", scratch));
                error = {};
            }
        }
        // The '}' right after the last member (or the '{').
        if (tape[0].end != (tape[0].next > 1 ? next_start : 2)) {
            tape.clear();
            last_updated.clear();
            return false;
        }
        pos = end;
        return true;
    }

    // A held member's value is complete in `held` from value_offset: tokenized now.
    bool complete_gathered_member() {
        const size_t limit = node_limit(held.size());
        if (tape.size() > limit) {
            return fail("too-large");  // tokenized from the start, it would stop at the limit
        }
        Tokenizer tokenizer(held.data(), held.size(), tape, limit);
        size_t end = resume_at;
        const Parse result = tokenizer.run(end, progress, 0, 1);
        if (result != Parse::Ok) {
            return fail(parse_error(result));
        }
        if (end != held.size()) {
            return fail("malformed-json");
        }
        return complete_held_member(std::string_view(key.data(), key_size));
    }

    // Still holding: the member was validated as it completed, so a fault is found where it is;
    // the type decides whether the entries will stream.
    bool complete_held_member(std::string_view name) {
        text = held;
        const uint32_t value_node = key_node + 1;
        if (name == "resourceType") {
            bundle =
                tape[value_node].kind == Kind::String && value(value_node, scratch) == "Bundle";
        } else if (name == "meta") {
            last_updated.assign(string_member(value_node, "lastUpdated", scratch));
            error = {};  // a duplicate here is judged with the whole resource
        }
        any_member = true;
        expect_more = false;
        return true;
    }

    // The top-level object ends here (its '}' is already in `held`).
    void close_root() {
        tape[0].end = static_cast<uint32_t>(held.size());
        tape[0].next = static_cast<uint32_t>(tape.size());
        begin_unit(held);
    }

    // A member after the entries is complete in `unit` ("{" + member): judged alone.
    bool complete_late_member(std::string &out) {
        expect_more = false;
        unit.push_back('}');
        tape.clear();
        Tokenizer tokenizer(unit.data(), unit.size(), tape, node_limit(unit.size()));
        size_t end = 0;
        const Parse result = tokenizer.value(end, kNoNode, 0);
        if (result != Parse::Ok) {
            return fail(parse_error(result));
        }
        if (end != unit.size()) {
            return fail("malformed-json");
        }
        begin_unit(unit);
        const std::string_view name(key.data(), key_size);
        if (name == "total") {
            return true;
        }
        if (name == "meta") {
            const uint32_t security = member(2, "security");
            if (security != kNoNode && tape[security].kind == Kind::Array) {
                for (uint32_t e = security + 1; e < tape[security].next; e = tape[e].next) {
                    if (withheld(string_member(e, "code", scratch))) {
                        // A label on the Bundle itself after its entries went out: too late.
                        return fail("late-bundle-label");
                    }
                }
            }
            if (!error.empty()) {
                return fail(error);
            }
        }
        out.push_back(',');
        out.append(unit.data() + 1, unit.size() - 2);
        return true;
    }

    // The Bundle's head is complete: judge it, release it, open the entry array.
    bool start_entries(std::string &out) {
        held.push_back('}');
        close_root();
        if (evaluate(0) != Verdict::Keep) {
            return error.empty() ? withhold("security-label") : fail(error);
        }
        if (!error.empty()) {
            return fail(error);
        }
        streaming = true;
        make_room(out, held.size() + kEditSlack);
        emit(0, out);
        out.pop_back();  // the '}'; the head always has resourceType, so entries follow a comma
        held.clear();
        if (held.capacity() > kKeptHeadBytes) {
            held.shrink_to_fit();  // not needed while the entries stream
        }
        return true;
    }

    // An entry starts at pos: tokenized in place when the chunk holds all of it, else gathered.
    // An entry cut by the chunk's end keeps what was tokenized of it: its bytes up to the token
    // that stopped the tokenizer are in `unit`, and the tokenization resumes there once the rest
    // is gathered. A fault also just stops it: gathered and resumed, the same token fails again.
    bool start_entry(const char *data, size_t size, size_t &pos, std::string &out) {
        tape.clear();
        progress.reset();
        const size_t limit = pos + std::min(size - pos, max_bytes());
        Tokenizer tokenizer(data, limit, tape, in_place_node_limit(0),
                            0 - static_cast<uint32_t>(pos));
        size_t end = pos;
        const Parse result = tokenizer.run(end, progress, kNoNode, 0);
        if (result == Parse::Ok && (end - pos) + tape.size() * sizeof(Node) <= max_bytes()) {
            begin_unit(std::string_view(data + pos, end - pos));
            pos = end;
            state = kAfterEntry;
            return judge_entry(out);
        }
        if (result == Parse::Ok) {
            // Over the cap: gathered from the start, for the gathering path to judge.
            tape.clear();
            progress.reset();
            end = pos;
        }
        unit.assign(data + pos, end - pos);
        resume_at = end - pos;
        // Scanning resumes at a token boundary inside the open containers.
        depth = progress.top;
        in_string = false;
        escape = false;
        value_kind = kContainer;
        pos = end;
        state = kEntryValue;
        return true;
    }

    bool complete_gathered_entry(std::string &out) {
        const size_t limit = node_limit(unit.size());
        if (tape.size() > limit) {
            return fail("too-large");  // tokenized from the start, it would stop at the limit
        }
        Tokenizer tokenizer(unit.data(), unit.size(), tape, limit);
        size_t end = resume_at;
        const Parse result = tokenizer.run(end, progress, kNoNode, 0);
        if (result != Parse::Ok) {
            return fail(parse_error(result));
        }
        if (end != unit.size()) {
            return fail("malformed-json");
        }
        begin_unit(unit);
        return judge_entry(out);
    }

    bool judge_entry(std::string &out) {
        const bool keep = keep_entry(0);
        if (!error.empty()) {
            return fail(error);
        }
        if (!keep) {
            ++counters().resources_removed;
            return true;
        }
        // The array opens with the first kept entry: an empty one would show there were entries.
        make_room(out, text.size() + kEditSlack);
        out.append(any_entry ? "," : ",\"entry\":[");
        any_entry = true;
        emit(0, out);
        return true;
    }

    // The top-level object is complete: in `held`, or read whole in place (text set).
    bool finish_document(std::string &out) {
        const bool in_place = state == kDocStart;
        state = kDocEnd;
        if (streaming) {
            out.push_back('}');
            return true;
        }
        // A single resource (or a Bundle without entries, or one whose type came late): held whole.
        if (!in_place) {
            held.push_back('}');
            close_root();
        }
        const Verdict verdict = evaluate(0);
        if (!error.empty()) {
            return fail(error);
        }
        if (verdict == Verdict::DropLabel) {
            return withhold("security-label");
        }
        if (verdict == Verdict::DropCompartment) {
            return withhold("outside-patient-compartment");
        }
        make_room(out, text.size() + kEditSlack);
        emit(0, out);
        return true;
    }
};

namespace {

// Set once this thread's pool is destroyed (at thread exit), for a Redactor that outlives it.
// Trivially destructible, so it can be read at any time.
thread_local bool engine_pool_gone = false;

// Engines of finished responses, kept for the next ones on the same thread: an nginx worker
// redacts response after response, most of them small, and a kept engine's buffers spare each
// of them its allocations. Bounded in count and in size, so what idles stays small.
class EnginePool {
  public:
    EnginePool() = default;
    EnginePool(const EnginePool &) = delete;
    EnginePool &operator=(const EnginePool &) = delete;
    ~EnginePool() {
        engine_pool_gone = true;
        for (size_t i = 0; i < count_; ++i) {
            delete engines_[i];
        }
    }

    Redactor::Impl *take() { return count_ == 0 ? new Redactor::Impl : engines_[--count_]; }

    void give(Redactor::Impl *engine) {
        if (count_ < engines_.size() && engine->memory() <= kKeptEngineBytes) {
            engine->owner = nullptr;
            engines_[count_++] = engine;
        } else {
            delete engine;
        }
    }

  private:
    static constexpr size_t kKeptEngineBytes = 32 * 1024;
    std::array<Redactor::Impl *, 8> engines_{};
    size_t count_ = 0;
};

thread_local EnginePool engine_pool;

}  // namespace

std::vector<std::string> split_labels(std::string_view list) {
    std::vector<std::string> out;
    size_t start = 0;
    while (start <= list.size()) {
        size_t comma = list.find(',', start);
        if (comma == std::string_view::npos) {
            comma = list.size();
        }
        std::string_view item = list.substr(start, comma - start);
        while (!item.empty() && is_ws(item.front())) {
            item.remove_prefix(1);
        }
        while (!item.empty() && is_ws(item.back())) {
            item.remove_suffix(1);
        }
        if (!item.empty()) {
            out.emplace_back(item);
        }
        start = comma + 1;
    }
    return out;
}

Redactor::Redactor(const Config &config, Request request)
    : config_(config),
      request_(std::move(request)),
      impl_(engine_pool_gone ? new Impl : engine_pool.take()) {
    impl_->start(config_, request_, *this);
}

Redactor::~Redactor() {
    if (engine_pool_gone) {
        delete impl_;
    } else {
        engine_pool.give(impl_);
    }
}

bool Redactor::complete() const {
    return impl_->state == kDocEnd && status_ == Status::Ok;
}

bool Redactor::single_resource() const {
    return !impl_->streaming;
}

std::string_view Redactor::last_updated() const {
    return impl_->last_updated;
}

Status Redactor::feed(std::string_view chunk, std::string &out) {
    if (status_ != Status::Ok) {
        return status_;
    }
    impl_->feed(chunk, out);
    peak_memory_ = std::max(peak_memory_, sizeof(*this) + impl_->memory());
    return status_;
}

Status Redactor::finish(std::string &out) {
    (void)out;
    if (status_ == Status::Ok && impl_->state != kDocEnd) {
        impl_->fail("truncated-json");
    }
    return status_;
}

}  // namespace ehrgate::redaction
