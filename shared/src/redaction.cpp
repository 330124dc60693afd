#include "ehrgate/redaction.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>

#include "ehrgate/compartment.hpp"

namespace ehrgate::redaction {

namespace {

constexpr size_t kMaxDepth = 128;

enum class Kind : uint8_t { Object, Array, String, Number, True, False, Null };

// One token of a unit. Strings span their quotes; containers span their brackets.
struct Node {
    uint32_t start;
    uint32_t end;
    uint32_t next;    // index of the first node after this subtree
    uint32_t parent;  // index of the enclosing container, or UINT32_MAX for the root
    Kind kind;
    bool escaped;  // a string containing a backslash escape
};

constexpr uint32_t kNoNode = UINT32_MAX;

// Per-node edit flags for re-emission.
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

// Eight bytes at a time (SWAR): the lowest flagged byte of each mask is exact, which is all the
// scanners need.
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

inline bool is_ws(char c) {
    return c == ' ' || c == '\n' || c == '\r' || c == '\t';
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

// Validates one UTF-8 sequence starting at s[i] (>= 0x80); returns its length or 0.
size_t utf8_sequence(std::string_view s, size_t i) {
    const auto b0 = static_cast<unsigned char>(s[i]);
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
    if (i + len > s.size()) {
        return 0;
    }
    const auto b1 = static_cast<unsigned char>(s[i + 1]);
    if (b1 < lo || b1 > hi) {
        return 0;
    }
    for (size_t k = 2; k < len; ++k) {
        const auto b = static_cast<unsigned char>(s[i + k]);
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

// A strict tokenizer over one complete unit, producing a flat tape (no per-token allocation).
class Tokenizer {
  public:
    Tokenizer(std::string_view text, std::vector<Node> &tape, std::vector<uint32_t> &open,
              size_t max_nodes)
        : s_(text), tape_(tape), max_nodes_(max_nodes), open_(open) {}

    // Returns an empty string on success, else an error code.
    std::string_view run() {
        tape_.clear();
        std::vector<uint32_t> &open = open_;
        open.clear();
        size_t pos = 0;
        skip_ws(pos);
        bool need_value = true;
        for (;;) {
            if (need_value) {
                if (pos >= s_.size()) {
                    return "malformed-json";
                }
                const char c = s_[pos];
                const uint32_t parent = open.empty() ? kNoNode : open.back();
                if (tape_.size() >= max_nodes_) {
                    return "too-large";
                }
                if (c == '{' || c == '[') {
                    if (open.size() >= kMaxDepth) {
                        return "too-deep";
                    }
                    const auto index = static_cast<uint32_t>(tape_.size());
                    tape_.push_back(Node{static_cast<uint32_t>(pos), 0, 0, parent,
                                         c == '{' ? Kind::Object : Kind::Array, false});
                    open.push_back(index);
                    ++pos;
                    skip_ws(pos);
                    if (pos < s_.size() && s_[pos] == (c == '{' ? '}' : ']')) {
                        close(pos);
                        need_value = false;
                    } else if (c == '{') {
                        if (!key(pos)) {
                            return "malformed-json";
                        }
                    }
                    continue;
                }
                if (c == '"') {
                    if (!string(pos, parent)) {
                        return "malformed-json";
                    }
                } else if (c == '-' || (c >= '0' && c <= '9')) {
                    if (!number(pos, parent)) {
                        return "malformed-json";
                    }
                } else if (!literal(pos, parent)) {
                    return "malformed-json";
                }
                need_value = false;
            }
            skip_ws(pos);
            if (open.empty()) {
                return pos == s_.size() ? std::string_view() : "malformed-json";
            }
            if (pos >= s_.size()) {
                return "malformed-json";
            }
            const Node &top = tape_[open.back()];
            const char c = s_[pos];
            if (c == ',') {
                ++pos;
                skip_ws(pos);
                if (top.kind == Kind::Object && !key(pos)) {
                    return "malformed-json";
                }
                need_value = true;
            } else if (c == (top.kind == Kind::Object ? '}' : ']')) {
                close(pos);
            } else {
                return "malformed-json";
            }
        }
    }

  private:
    void skip_ws(size_t &pos) const {
        while (pos < s_.size() && is_ws(s_[pos])) {
            ++pos;
        }
    }

    void close(size_t &pos) {
        const uint32_t index = open_.back();
        open_.pop_back();
        tape_[index].end = static_cast<uint32_t>(pos + 1);
        tape_[index].next = static_cast<uint32_t>(tape_.size());
        ++pos;
    }

    // A member key, then the colon; leaves pos at the value.
    bool key(size_t &pos) {
        if (pos >= s_.size() || s_[pos] != '"' || tape_.size() >= max_nodes_) {
            return false;
        }
        if (!string(pos, open_.back())) {
            return false;
        }
        skip_ws(pos);
        if (pos >= s_.size() || s_[pos] != ':') {
            return false;
        }
        ++pos;
        skip_ws(pos);
        return true;
    }

    bool string(size_t &pos, uint32_t parent) {
        const size_t start = pos++;
        bool escaped = false;
        const char *data = s_.data();
        const size_t size = s_.size();
        for (;;) {
            // Plain ASCII runs are the common case.
            while (pos + 8 <= size) {
                const uint64_t v = load8(data + pos);
                const uint64_t m =
                    bytes_equal(v, '"') | bytes_equal(v, '\\') | bytes_below(v, 0x20) | (v & kHigh);
                if (m != 0) {
                    pos += first_flagged(m);
                    break;
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
            if (pos >= size) {
                return false;
            }
            const auto c = static_cast<unsigned char>(data[pos]);
            if (c == '"') {
                break;
            }
            if (c < 0x20) {
                return false;
            }
            if (c >= 0x80) {
                const size_t len = utf8_sequence(s_, pos);
                if (len == 0) {
                    return false;
                }
                pos += len;
                continue;
            }
            escaped = true;
            if (pos + 1 >= size) {
                return false;
            }
            const char e = data[pos + 1];
            if (e == 'u') {
                if (pos + 6 > size) {
                    return false;
                }
                for (size_t k = 2; k < 6; ++k) {
                    if (hex_value(data[pos + k]) < 0) {
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
        }
        ++pos;
        const auto index = static_cast<uint32_t>(tape_.size());
        tape_.push_back(Node{static_cast<uint32_t>(start), static_cast<uint32_t>(pos), index + 1,
                             parent, Kind::String, escaped});
        return true;
    }

    bool number(size_t &pos, uint32_t parent) {
        const size_t start = pos;
        auto digit = [&](size_t p) { return p < s_.size() && s_[p] >= '0' && s_[p] <= '9'; };
        if (s_[pos] == '-') {
            ++pos;
        }
        if (!digit(pos)) {
            return false;
        }
        if (s_[pos] == '0') {
            ++pos;
        } else {
            while (digit(pos)) {
                ++pos;
            }
        }
        if (pos < s_.size() && s_[pos] == '.') {
            ++pos;
            if (!digit(pos)) {
                return false;
            }
            while (digit(pos)) {
                ++pos;
            }
        }
        if (pos < s_.size() && (s_[pos] == 'e' || s_[pos] == 'E')) {
            ++pos;
            if (pos < s_.size() && (s_[pos] == '+' || s_[pos] == '-')) {
                ++pos;
            }
            if (!digit(pos)) {
                return false;
            }
            while (digit(pos)) {
                ++pos;
            }
        }
        const auto index = static_cast<uint32_t>(tape_.size());
        tape_.push_back(Node{static_cast<uint32_t>(start), static_cast<uint32_t>(pos), index + 1,
                             parent, Kind::Number, false});
        return true;
    }

    bool literal(size_t &pos, uint32_t parent) {
        const std::string_view rest = s_.substr(pos);
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
        const auto index = static_cast<uint32_t>(tape_.size());
        tape_.push_back(Node{static_cast<uint32_t>(pos), static_cast<uint32_t>(pos + len),
                             index + 1, parent, kind, false});
        pos += len;
        return true;
    }

    std::string_view s_;
    std::vector<Node> &tape_;
    size_t max_nodes_;
    std::vector<uint32_t> &open_;  // the open containers, reused across units
};

}  // namespace

// Evaluation and re-emission of one tokenized unit.
struct Redactor::Impl {
    Impl(const Config &config, const Request &request) : config(config), request(request) {}

    const Config &config;
    const Request &request;
    std::string_view text;
    std::vector<Node> tape;
    std::vector<uint32_t> open;
    std::vector<uint8_t> flags;
    std::string scratch;
    std::string scratch2;
    std::string_view error;  // set when evaluation meets something it must refuse
    Counters *counters = nullptr;

    std::string_view tokenize(std::string_view unit, size_t max_nodes) {
        text = unit;
        error = {};
        const std::string_view result = Tokenizer(unit, tape, open, max_nodes).run();
        if (result.empty()) {
            flags.assign(tape.size(), 0);
        }
        return result;
    }

    size_t memory() const {
        return tape.capacity() * sizeof(Node) + flags.capacity() + scratch.capacity() +
               scratch2.capacity();
    }

    // The raw text between a string node's quotes.
    std::string_view raw(uint32_t i) const {
        const Node &n = tape[i];
        return text.substr(n.start + 1, n.end - n.start - 2);
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

    bool key_is(uint32_t key, std::string_view name) {
        const Node &n = tape[key];
        if (!n.escaped) {
            return raw(key) == name;
        }
        return value(key, scratch2) == name;
    }

    // The value node of member `name` of object `obj`; kNoNode if absent. Duplicate keys are a
    // parser differential waiting to happen: refused.
    uint32_t member(uint32_t obj, std::string_view name) {
        if (obj == kNoNode || tape[obj].kind != Kind::Object) {
            return kNoNode;
        }
        uint32_t found = kNoNode;
        for (uint32_t k = obj + 1; k < tape[obj].next; k = tape[k + 1].next) {
            if (key_is(k, name)) {
                if (found != kNoNode) {
                    error = "duplicate-key";
                    return kNoNode;
                }
                found = k + 1;
            }
        }
        return found;
    }

    std::string_view string_member(uint32_t obj, std::string_view name, std::string &buffer) {
        const uint32_t v = member(obj, name);
        if (v == kNoNode || tape[v].kind != Kind::String) {
            return {};
        }
        return value(v, buffer);
    }

    bool withheld(std::string_view code) const {
        for (const std::string &label : request.withheld) {
            if (label == code) {
                return true;
            }
        }
        return false;
    }

    // Marks node i and its ancestors up to (excluding) nothing as changed.
    void mark(uint32_t i, uint8_t flag) {
        flags[i] |= flag;
        for (uint32_t p = tape[i].parent; p != kNoNode; p = tape[p].parent) {
            if (flags[p] & kDirty) {
                break;
            }
            flags[p] |= kDirty;
        }
    }

    void remove(uint32_t i) {
        if ((flags[i] & kRemoved) == 0) {
            mark(i, kRemoved);
            ++counters->elements_removed;
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
        const std::string_view base = request.server_base;
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
        return reference == request.patient_id;
    }

    bool in_compartment(uint32_t resource, std::string_view type) {
        if (type == "Patient") {
            return string_member(resource, "id", scratch) == request.patient_id;
        }
        if (compartment::is_shared_reference_type(type)) {
            return true;
        }
        std::vector<uint32_t> references;
        for (const std::string_view path : compartment::reference_paths(type)) {
            references.clear();
            collect(resource, path, references);
            for (const uint32_t ref : references) {
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
        for (uint32_t i = resource; i < tape[resource].next; ++i) {
            if (tape[i].kind != Kind::Object) {
                continue;
            }
            uint32_t system = kNoNode, code = kNoNode, extension = kNoNode;
            for (uint32_t k = i + 1; k < tape[i].next; k = tape[k + 1].next) {
                const std::string_view name = tape[k].escaped ? value(k, scratch2) : raw(k);
                uint32_t *slot = name == "system"      ? &system
                                 : name == "code"      ? &code
                                 : name == "extension" ? &extension
                                                       : nullptr;
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
                    const uint32_t key = key_of(parent);
                    if (key != kNoNode && key_is(key, "security") && withheld(code_value)) {
                        return true;
                    }
                }
                if (system != kNoNode && tape[system].kind == Kind::String) {
                    const std::string_view system_value = value(system, scratch);
                    for (const InferenceRule &rule : config.inference) {
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
        const uint32_t key = key_of(v);
        if (key == kNoNode) {
            mark_empty_check(tape[v].parent);
            return;
        }
        const std::string_view name = tape[key].escaped ? value(key, scratch2) : raw(key);
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
            flags[array] |= kSkipIfEmptyArray;
        }
    }

    void apply_masks(uint32_t resource, std::string_view type) {
        std::vector<uint32_t> found;
        for (const FieldMask &mask : config.masks) {
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
            return;
        }
        const uint32_t security = member(meta, "security");
        if (security == kNoNode) {
            mark(meta, kAddSecurity);
            return;
        }
        if (tape[security].kind != Kind::Array) {
            error = "malformed-resource";
            return;
        }
        for (uint32_t e = security + 1; e < tape[security].next; e = tape[e].next) {
            if ((flags[e] & kRemoved) == 0 && string_member(e, "code", scratch) == kRedactedCode &&
                string_member(e, "system", scratch2) == kObligationSystem) {
                return;
            }
        }
        mark(security, kAppendRedacted);
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
        if (!request.patient_id.empty() && !in_compartment(resource, type)) {
            return Verdict::DropCompartment;
        }
        const uint64_t removed_before = counters->elements_removed;
        if (sensitive(resource)) {
            counters->elements_removed = removed_before;
            return Verdict::DropLabel;
        }
        apply_masks(resource, type);
        if (counters->elements_removed != removed_before) {
            add_redacted_marker(resource);
            ++counters->resources_masked;
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
                ++counters->resources_removed;
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

    // Writes node i with its edits.
    void emit(uint32_t i, std::string &out) const {
        const Node &n = tape[i];
        if ((flags[i] & ~kRemoved & ~kSkipIfEmptyArray) == 0) {
            out.append(text.data() + n.start, n.end - n.start);
            return;
        }
        if (n.kind == Kind::Object) {
            out.push_back('{');
            bool first = true;
            for (uint32_t k = i + 1; k < n.next; k = tape[k + 1].next) {
                const uint32_t v = k + 1;
                if ((flags[v] & kRemoved) || empty_after_edits(v)) {
                    continue;
                }
                if (!first) {
                    out.push_back(',');
                }
                first = false;
                out.append(text.data() + tape[k].start, tape[k].end - tape[k].start);
                out.push_back(':');
                emit(v, out);
            }
            if (flags[i] & kAddSecurity) {
                out.append(first ? "" : ",").append("\"security\":[").append(kRedactedCoding);
                out.push_back(']');
                first = false;
            }
            if (flags[i] & kAddMeta) {
                out.append(first ? "" : ",").append("\"meta\":{\"security\":[");
                out.append(kRedactedCoding).append("]}");
            }
            out.push_back('}');
            return;
        }
        // Array.
        out.push_back('[');
        bool first = true;
        for (uint32_t e = i + 1; e < n.next; e = tape[e].next) {
            if (flags[e] & kRemoved) {
                continue;
            }
            if (!first) {
                out.push_back(',');
            }
            first = false;
            emit(e, out);
        }
        if (flags[i] & kAppendRedacted) {
            if (!first) {
                out.push_back(',');
            }
            out.append(kRedactedCoding);
        }
        out.push_back(']');
    }

    // FHIR forbids empty arrays: an array emptied by removals goes with its member.
    bool empty_after_edits(uint32_t v) const {
        if ((flags[v] & kSkipIfEmptyArray) == 0 || (flags[v] & kAppendRedacted)) {
            return false;
        }
        for (uint32_t e = v + 1; e < tape[v].next; e = tape[e].next) {
            if ((flags[e] & kRemoved) == 0) {
                return false;
            }
        }
        return true;
    }
};

namespace {

enum State : uint8_t {
    kDocStart,
    kMemberStart,
    kKey,
    kColon,
    kValueStart,
    kValue,
    kAfterMember,
    kEntriesOpen,
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
      impl_(new Impl(config_, request_)),
      state_(kDocStart) {
    impl_->counters = &counters_;
}

Redactor::~Redactor() {
    delete impl_;
}

bool Redactor::complete() const {
    return state_ == kDocEnd && status_ == Status::Ok;
}

bool Redactor::single_resource() const {
    return !streaming_;
}

Status Redactor::fail(std::string_view reason) {
    status_ = Status::Error;
    reason_ = reason;
    return status_;
}

Status Redactor::withhold(std::string_view reason) {
    status_ = Status::Withheld;
    reason_ = reason;
    return status_;
}

void Redactor::note_memory() {
    const size_t now =
        unit_.capacity() + held_.capacity() + key_.capacity() + impl_->memory() + sizeof(*this);
    peak_memory_ = std::max(peak_memory_, now);
}

Status Redactor::feed(std::string_view chunk, std::string &out) {
    if (status_ != Status::Ok) {
        return status_;
    }
    size_t pos = 0;
    while (pos < chunk.size() && status_ == Status::Ok) {
        if (!step(chunk, pos, out)) {
            break;
        }
    }
    note_memory();
    return status_;
}

Status Redactor::finish(std::string &out) {
    if (status_ != Status::Ok) {
        return status_;
    }
    (void)out;
    if (state_ != kDocEnd) {
        return fail("truncated-json");
    }
    return status_;
}

// Finds the end of the current string or container value; state kept in locals so the loop
// does not reload members, written back at the end.
bool Redactor::scan_value(const char *data, size_t size, size_t &pos) {
    uint32_t depth = depth_;
    bool in_string = in_string_;
    bool escape = escape_;
    const bool string_only = value_kind_ == kStringValue;
    bool complete = false;
    while (pos < size) {
        if (in_string) {
            if (escape) {
                escape = false;
                ++pos;
                continue;
            }
            pos = find_quote_or_backslash(data, pos, size);
            if (pos >= size) {
                break;
            }
            if (data[pos++] == '\\') {
                escape = true;
                continue;
            }
            in_string = false;
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
            in_string = true;
        } else if (kind == 2) {
            ++depth;
        } else if (depth == 0 || --depth == 0) {
            complete = true;
            break;
        }
    }
    depth_ = depth;
    in_string_ = in_string;
    escape_ = escape;
    return complete;
}

// Consumes as much of chunk from pos as one state allows. False stops the loop (error set).
bool Redactor::step(std::string_view chunk, size_t &pos, std::string &out) {
    const char *data = chunk.data();
    const size_t size = chunk.size();
    auto skip_ws = [&] {
        while (pos < size && is_ws(data[pos])) {
            ++pos;
        }
        return pos < size;
    };
    switch (state_) {
        case kDocStart:
            if (!skip_ws()) {
                return true;
            }
            if (data[pos] != '{') {
                fail("malformed-json");
                return false;
            }
            ++pos;
            held_.assign("{");
            state_ = kMemberStart;
            return true;
        case kMemberStart:
            if (!skip_ws()) {
                return true;
            }
            if (data[pos] == '}' && !expect_more_) {
                ++pos;
                return finish_document(out);
            }
            if (data[pos] != '"') {
                fail("malformed-json");
                return false;
            }
            ++pos;
            key_.clear();
            state_ = kKey;
            return true;
        case kKey: {
            const size_t start = pos;
            while (pos < size) {
                const char c = data[pos];
                if (escape_) {
                    escape_ = false;
                } else if (c == '\\') {
                    escape_ = true;
                } else if (c == '"') {
                    break;
                }
                ++pos;
            }
            key_.append(data + start, pos - start);
            if (key_.size() > 256) {
                fail("malformed-json");
                return false;
            }
            if (pos < size) {
                ++pos;
                state_ = kColon;
            }
            return true;
        }
        case kColon:
            if (!skip_ws()) {
                return true;
            }
            if (data[pos] != ':') {
                fail("malformed-json");
                return false;
            }
            ++pos;
            state_ = kValueStart;
            return true;
        case kValueStart: {
            if (!skip_ws()) {
                return true;
            }
            if (key_ == "entry" && bundle_ && !streaming_) {
                if (data[pos] != '[') {
                    fail("malformed-bundle");
                    return false;
                }
                ++pos;
                if (!start_entries(out)) {
                    return false;
                }
                state_ = kEntryStart;
                expect_more_ = false;
                return true;
            }
            if (streaming_ && key_ == "entry") {
                fail("duplicate-key");
                return false;
            }
            // Held as a one-member object so it can be tokenized in place.
            unit_.assign("{\"").append(key_).append("\":");
            const char c = data[pos];
            depth_ = 0;
            in_string_ = false;
            escape_ = false;
            if (c == '{' || c == '[') {
                value_kind_ = kContainer;
            } else if (c == '"') {
                value_kind_ = kStringValue;
                in_string_ = true;
                unit_.push_back(c);
                ++pos;
            } else {
                value_kind_ = kScalar;
            }
            state_ = kValue;
            return true;
        }
        case kValue:
        case kEntryValue: {
            const size_t start = pos;
            bool complete = false;
            if (value_kind_ == kScalar) {
                while (pos < size && scalar_char(data[pos])) {
                    ++pos;
                }
                complete = pos < size;
            } else {
                complete = scan_value(data, size, pos);
            }
            unit_.append(data + start, pos - start);
            if (unit_.size() + held_.size() > config_.max_held_bytes) {
                fail("too-large");
                return false;
            }
            if (!complete) {
                return true;
            }
            if (state_ == kValue) {
                state_ = kAfterMember;
                return complete_member(out);
            }
            state_ = kAfterEntry;
            return complete_entry(out);
        }
        case kAfterMember:
            if (!skip_ws()) {
                return true;
            }
            if (data[pos] == ',') {
                ++pos;
                expect_more_ = true;
                state_ = kMemberStart;
                return true;
            }
            if (data[pos] == '}') {
                ++pos;
                return finish_document(out);
            }
            fail("malformed-json");
            return false;
        case kEntryStart:
            if (!skip_ws()) {
                return true;
            }
            if (data[pos] == ']' && !expect_more_) {
                ++pos;
                state_ = kAfterMember;
                return true;
            }
            if (data[pos] != '{') {
                fail("malformed-bundle");
                return false;
            }
            unit_.clear();
            depth_ = 0;
            in_string_ = false;
            escape_ = false;
            value_kind_ = kContainer;
            state_ = kEntryValue;
            return true;
        case kAfterEntry:
            if (!skip_ws()) {
                return true;
            }
            if (data[pos] == ',') {
                ++pos;
                expect_more_ = true;
                state_ = kEntryStart;
                return true;
            }
            if (data[pos] == ']') {
                ++pos;
                if (any_entry_) {
                    out.push_back(']');
                }
                expect_more_ = false;
                state_ = kAfterMember;
                return true;
            }
            fail("malformed-json");
            return false;
        case kDocEnd:
            if (!skip_ws()) {
                return true;
            }
            fail("malformed-json");
            return false;
        default:
            fail("internal-error");
            return false;
    }
}

// A top-level member is complete in unit_ ("{" + member).
bool Redactor::complete_member(std::string &out) {
    expect_more_ = false;
    unit_.push_back('}');
    const std::string_view error = impl_->tokenize(unit_, budget());
    if (!error.empty()) {
        fail(error);
        return false;
    }
    const std::string_view member(unit_.data() + 1, unit_.size() - 2);
    std::string buffer;
    if (!streaming_) {
        // Still holding: validated now so a fault is found where it is; the type decides.
        if (key_ == "resourceType") {
            bundle_ = impl_->tape[2].kind == Kind::String && impl_->value(2, buffer) == "Bundle";
        } else if (key_ == "meta") {
            last_updated_ = std::string(impl_->string_member(2, "lastUpdated", buffer));
        }
        if (any_member_) {
            held_.push_back(',');
        }
        held_.append(member);
        any_member_ = true;
        return true;
    }
    // After the entries: the Bundle's remaining members, each judged alone.
    if (key_ == "total") {
        return true;
    }
    if (key_ == "meta") {
        const uint32_t security = impl_->member(2, "security");
        if (security != kNoNode && impl_->tape[security].kind == Kind::Array) {
            for (uint32_t e = security + 1; e < impl_->tape[security].next;
                 e = impl_->tape[e].next) {
                if (impl_->withheld(impl_->string_member(e, "code", buffer))) {
                    // A label on the Bundle itself after its entries went out: too late.
                    fail("late-bundle-label");
                    return false;
                }
            }
        }
        if (!impl_->error.empty()) {
            fail(impl_->error);
            return false;
        }
    }
    out.push_back(',');
    out.append(member);
    return true;
}

size_t Redactor::budget() const {
    const size_t used = held_.size() + unit_.size();
    return used >= config_.max_held_bytes ? 0
                                          : (config_.max_held_bytes - used) / (sizeof(Node) + 1);
}

// The Bundle's head is complete: judge it, release it, open the entry array.
bool Redactor::start_entries(std::string &out) {
    held_.push_back('}');
    const std::string_view error = impl_->tokenize(held_, budget());
    if (!error.empty()) {
        fail(error);
        return false;
    }
    if (impl_->evaluate(0) != Impl::Verdict::Keep) {
        if (!impl_->error.empty()) {
            fail(impl_->error);
        } else {
            withhold("security-label");
        }
        return false;
    }
    if (!impl_->error.empty()) {
        fail(impl_->error);
        return false;
    }
    streaming_ = true;
    impl_->emit(0, out);
    out.pop_back();  // the '}'; the head always has resourceType, so entries follow a comma
    held_.clear();
    held_.shrink_to_fit();
    return true;
}

bool Redactor::complete_entry(std::string &out) {
    const std::string_view error = impl_->tokenize(unit_, budget());
    if (!error.empty()) {
        fail(error);
        return false;
    }
    const bool keep = impl_->keep_entry(0);
    if (!impl_->error.empty()) {
        fail(impl_->error);
        return false;
    }
    if (!keep) {
        ++counters_.resources_removed;
        return true;
    }
    // The array opens with the first kept entry: an empty one would show there were entries.
    out.append(any_entry_ ? "," : ",\"entry\":[");
    any_entry_ = true;
    impl_->emit(0, out);
    return true;
}

bool Redactor::finish_document(std::string &out) {
    state_ = kDocEnd;
    if (streaming_) {
        out.push_back('}');
        return true;
    }
    // A single resource (or a Bundle without entries, or one whose type came late): held whole.
    held_.push_back('}');
    const std::string_view error = impl_->tokenize(held_, budget());
    if (!error.empty()) {
        fail(error);
        return false;
    }
    const Impl::Verdict verdict = impl_->evaluate(0);
    if (!impl_->error.empty()) {
        fail(impl_->error);
        return false;
    }
    if (verdict == Impl::Verdict::DropLabel) {
        withhold("security-label");
        return false;
    }
    if (verdict == Impl::Verdict::DropCompartment) {
        withhold("outside-patient-compartment");
        return false;
    }
    impl_->emit(0, out);
    return true;
}

}  // namespace ehrgate::redaction
