// A strict RFC 8259 JSON parser with a small DOM, for the small documents the gateway must trust
// the structure of: JWT headers and payloads, JWKS documents. Large bodies go through the
// redaction engine's streaming parser instead.
//
// Strictness is the point: a token whose header says {"alg":"RS256","alg":"none"} means different
// things to different parsers, so anything two parsers could read differently is refused
// (duplicate keys compared after unescaping, invalid or overlong UTF-8, lone surrogates, leading
// zeros, trailing data, numbers that do not fit a double).
//
// Runs on the nginx request path: parse() never throws (out of memory is reported as an error)
// and never uses global state. The DOM of a document of n bytes takes at most a few dozen times n
// (a value node is 40 bytes, the smallest JSON value one byte), so callers bound memory through
// `Limits::max_bytes`; recursion is bounded by `Limits::max_depth`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace ehrgate::json {

struct Limits {
    size_t max_bytes = size_t{1} << 20;
    // Containers nested deeper than this are refused. The parser recurses once per level, so
    // values above kHardMaxDepth are lowered to it.
    size_t max_depth = 32;
};

inline constexpr size_t kHardMaxDepth = 256;

enum class ParseErrorCode : uint8_t {
    None,
    TooLarge,
    TooDeep,
    UnexpectedEnd,
    UnexpectedCharacter,
    TrailingData,
    InvalidUtf8,
    ControlCharacter,
    InvalidEscape,
    LoneSurrogate,
    InvalidNumber,
    NumberOutOfRange,
    DuplicateKey,
    OutOfMemory,
};

// Stable kebab-case name for logs and metrics, e.g. "duplicate-key".
std::string_view parse_error_code_name(ParseErrorCode code);

struct ParseError {
    ParseErrorCode code = ParseErrorCode::None;
    size_t offset = 0;  // byte offset into the text where the problem was detected
    std::string message;
};

class Value {
  public:
    using Array = std::vector<Value>;
    using Member = std::pair<std::string, Value>;
    // Members in document order; keys are unique (the parser guarantees it).
    using Object = std::vector<Member>;

    enum class Type : uint8_t { Null, Bool, Int, Double, String, Array, Object };

    Value() = default;  // null

    // Named constructors: Value(1) would be ambiguous between bool, int64_t and double.
    static Value from_bool(bool value) { return Value(Storage(std::in_place_index<1>, value)); }
    static Value from_int(int64_t value) { return Value(Storage(std::in_place_index<2>, value)); }
    static Value from_double(double value) { return Value(Storage(std::in_place_index<3>, value)); }
    static Value from_string(std::string value) {
        return Value(Storage(std::in_place_index<4>, std::move(value)));
    }
    static Value from_array(Array value) {
        return Value(Storage(std::in_place_index<5>, std::move(value)));
    }
    static Value from_object(Object value) {
        return Value(Storage(std::in_place_index<6>, std::move(value)));
    }

    Type type() const { return static_cast<Type>(storage_.index()); }
    bool is_null() const { return type() == Type::Null; }
    bool is_bool() const { return type() == Type::Bool; }
    // Integers written without fraction or exponent that fit int64_t are stored as Int; every
    // other number is a Double.
    bool is_number() const { return type() == Type::Int || type() == Type::Double; }
    bool is_int() const { return type() == Type::Int; }
    bool is_string() const { return type() == Type::String; }
    bool is_array() const { return type() == Type::Array; }
    bool is_object() const { return type() == Type::Object; }

    std::optional<bool> as_bool() const;
    // An Int, or a Double with an integral value that int64_t represents exactly (1e3 -> 1000).
    std::optional<int64_t> as_int() const;
    // Any number (an Int may round).
    std::optional<double> as_double() const;
    const std::string *as_string() const { return std::get_if<4>(&storage_); }
    const Array *as_array() const { return std::get_if<5>(&storage_); }
    const Object *as_object() const { return std::get_if<6>(&storage_); }

    // The member named `key` of an object; nullptr when absent or when this is not an object.
    const Value *find(std::string_view key) const;

  private:
    using Storage = std::variant<std::monostate, bool, int64_t, double, std::string, Array, Object>;
    explicit Value(Storage storage) : storage_(std::move(storage)) {}

    Storage storage_;
};

// Parses exactly one JSON value (surrounding whitespace allowed). On failure returns nullopt and,
// when `error` is not null, fills it. Never throws.
std::optional<Value> parse(std::string_view text, ParseError *error, const Limits &limits = {});

}  // namespace ehrgate::json
