/*
 * jsonx: a JSON transform in C (wasm32-wasi, Debian's clang + wasi-libc).
 *
 * Reads one JSON value from stdin and writes it back compactly with every
 * string *value* upper-cased (object keys stay as they are). When the value
 * is an object, a field "fields" with its number of members is appended.
 * Invalid JSON: a message on stderr and exit status 1.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *begin; /* start of input */
static const char *p;     /* parse position */
static const char *end;   /* end of input */

static void fail(const char *what) {
    fprintf(stderr, "jsonx: invalid JSON: %s at offset %ld\n", what, (long)(p - begin));
    exit(1);
}

static void skip_ws(void) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
}

static void value(int depth);

/* Copies a string literal, upper-casing it if `upper`. */
static void string(int upper) {
    if (p >= end || *p != '"') fail("expected a string");
    putchar(*p++);
    while (p < end && *p != '"') {
        if (*p == '\\') {
            putchar(*p++);
            if (p >= end) fail("unterminated escape");
            putchar(*p++);
            continue;
        }
        if ((unsigned char)*p < 0x20) fail("control character in string");
        putchar(upper ? toupper((unsigned char)*p) : *p);
        p++;
    }
    if (p >= end) fail("unterminated string");
    putchar(*p++);
}

static void literal(const char *word) {
    size_t n = strlen(word);
    if ((size_t)(end - p) < n || strncmp(p, word, n) != 0) fail("unknown literal");
    fputs(word, stdout);
    p += n;
}

static void number(void) {
    const char *start = p;
    if (p < end && *p == '-') p++;
    while (p < end && (isdigit((unsigned char)*p) || *p == '.' || *p == 'e' || *p == 'E' || *p == '+' || *p == '-')) p++;
    if (p == start) fail("expected a value");
    fwrite(start, 1, (size_t)(p - start), stdout);
}

static void object(int depth) {
    long fields = 0;
    putchar(*p++); /* { */
    skip_ws();
    if (p < end && *p == '}') {
        p++;
        if (depth == 0) fputs("\"fields\":0", stdout);
        putchar('}');
        return;
    }
    for (;;) {
        skip_ws();
        string(0);
        skip_ws();
        if (p >= end || *p != ':') fail("expected ':'");
        putchar(*p++);
        skip_ws();
        value(depth + 1);
        fields++;
        skip_ws();
        if (p < end && *p == ',') { putchar(*p++); continue; }
        if (p < end && *p == '}') { p++; break; }
        fail("expected ',' or '}'");
    }
    if (depth == 0) printf(",\"fields\":%ld", fields);
    putchar('}');
}

static void array(int depth) {
    putchar(*p++); /* [ */
    skip_ws();
    if (p < end && *p == ']') { putchar(*p++); return; }
    for (;;) {
        skip_ws();
        value(depth + 1);
        skip_ws();
        if (p < end && *p == ',') { putchar(*p++); continue; }
        if (p < end && *p == ']') { putchar(*p++); return; }
        fail("expected ',' or ']'");
    }
}

static void value(int depth) {
    if (depth > 64) fail("nested too deeply");
    skip_ws();
    if (p >= end) fail("unexpected end");
    switch (*p) {
    case '{': object(depth); break;
    case '[': array(depth); break;
    case '"': string(1); break;
    case 't': literal("true"); break;
    case 'f': literal("false"); break;
    case 'n': literal("null"); break;
    default: number(); break;
    }
}

int main(void) {
    size_t cap = 4096, len = 0, n;
    char *buf = malloc(cap + 1);
    if (!buf) { fputs("jsonx: out of memory\n", stderr); return 2; }
    while ((n = fread(buf + len, 1, cap - len, stdin)) > 0) {
        len += n;
        if (len == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
            if (!buf) { fputs("jsonx: out of memory\n", stderr); return 2; }
        }
    }
    buf[len] = '\0';
    begin = p = buf;
    end = buf + len;
    value(0);
    skip_ws();
    if (p != end) fail("trailing characters");
    putchar('\n');
    return 0;
}
