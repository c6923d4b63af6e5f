//! Source lint for 64-bit integer division and modulo in the kernels (issue 15 item 2:
//! "no per-element 64-bit division"). A GPU has no integer divider: a 64-bit `/` or `%`
//! by a value not known at compile time is a call to a ~70-instruction subroutine
//! (`__internal_udiv64`-like, the `I2F.U64.RP` sequence in sm_86 SASS); 32-bit ones are
//! a short inline sequence, and division by a constant is a multiply.
//!
//! Heuristic, per `__device__` / kernel function of `kernels/*.cu`: a `/`, `%`, `/=` or
//! `%=` whose divisor is not a literal or an upper-case constant, on a line that names
//! a variable the function declares as 64-bit (`long long`, `int64_t`, `size_t`,
//! `uint64_t`, `unsigned long long`) or casts to one — counted only where it runs per
//! iteration: inside a loop of its function (`for`, `while`, `do`, the loop header
//! included), or anywhere in a function called from inside a loop. Each kernel is
//! charged with the counted lines of the functions it calls (transitively, by name: a
//! name shared by two functions merges them, which can over-report). Per-thread setup
//! before a grid-stride loop is not counted. Divisions the compiler introduces are not
//! seen; the SASS check on a real toolchain is the stronger test.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A function body found in a `.cu` file.
struct Func {
    /// Names of the functions its body calls, and whether from inside a loop.
    calls: BTreeSet<(String, bool)>,
    /// Flagged lines: `file:line`, and whether inside a loop of the function.
    flagged: Vec<(String, bool)>,
}

const WIDE: [&str; 5] = [
    "unsigned long long",
    "long long",
    "int64_t",
    "uint64_t",
    "size_t",
];

fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn ident_at(s: &str, start: usize) -> &str {
    let end = s[start..]
        .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
        .map_or(s.len(), |e| start + e);
    &s[start..end]
}

fn idents(line: &str) -> Vec<&str> {
    line.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
        .filter(|w| !w.is_empty())
        .collect()
}

/// Whether `line` divides by a run-time value (not a literal / upper-case constant).
fn runtime_division(line: &str) -> bool {
    let bytes = line.as_bytes();
    for (i, &ch) in bytes.iter().enumerate() {
        if ch != b'/' && ch != b'%' {
            continue;
        }
        let mut j = i + 1;
        if j < bytes.len() && bytes[j] == b'=' {
            j += 1;
        }
        while j < bytes.len() && (bytes[j] == b' ' || bytes[j] == b'(') {
            j += 1;
        }
        if j >= bytes.len() {
            continue;
        }
        let next = bytes[j] as char;
        if next.is_ascii_digit() {
            continue;
        }
        // A float dividend (`1.0f / …`) makes it a float division.
        let left: String = line[..i]
            .trim_end()
            .chars()
            .rev()
            .take_while(|ch| ch.is_ascii_alphanumeric() || *ch == '.' || *ch == '_')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if left.starts_with(|ch: char| ch.is_ascii_digit())
            && (left.contains('.') || left.ends_with('f'))
        {
            continue;
        }
        let id = ident_at(line, j);
        if id.is_empty() {
            continue;
        }
        let first = id.chars().next().unwrap_or('a');
        // A divisor cast to a float type makes it a float division.
        let float_cast = matches!(id, "float" | "double");
        let constant = float_cast
            || first.is_ascii_uppercase()
            || (id.starts_with('k') && id.chars().nth(1).is_some_and(|c| c.is_ascii_uppercase()))
            || id == "sizeof";
        if !constant {
            return true;
        }
    }
    false
}

/// Attribute-like macros that come before a function's name with their own parentheses
/// (`AK_KERNEL_BOUND(256) void f(…)`, `__launch_bounds__(256, 2)`): not the name.
const ATTRS: [&str; 2] = ["__launch_bounds__", "AK_KERNEL_BOUND"];

/// The name a definition line defines: the identifier right before the first `(` that
/// does not belong to an attribute-like macro ([`ATTRS`]). Macro-generated entry points
/// are named `<family>_##DT` (any parameter name): the name is cut at `##`.
fn def_name(l: &str) -> String {
    let mut from = 0;
    while let Some(rel) = l[from..].find('(') {
        let open = from + rel;
        let mut head = l[..open].trim_end().to_string();
        // Only a `##` after the skipped attributes cuts the name (an attribute's
        // argument may paste tokens too: `__launch_bounds__(256, MB_##SUF)`).
        if let Some(p) = head.get(from..).and_then(|h| h.find("##")) {
            head.truncate(from + p);
        }
        let start = head
            .rfind(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .map_or(0, |p| p + 1);
        let name = &head[start..];
        if !ATTRS.contains(&name) {
            return name.to_string();
        }
        // Skip the attribute's balanced parentheses.
        let mut depth = 0i32;
        let mut end = l.len();
        for (k, ch) in l[open..].char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        from = end;
    }
    String::new()
}

/// Every function definition: name -> file -> body facts. Same-named functions of
/// one file (overloads) are merged; those of different files stay apart, so a call
/// resolves to the caller's own file first ([`div64`]).
type Funcs = HashMap<String, BTreeMap<String, Func>>;

/// Parses every function of one file into `out`.
fn functions(file: &str, src: &str, out: &mut Funcs) {
    let text = strip_comments(src);
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        // A kernel entry point returns void: a line that merely mentions AK_KERNEL (a
        // macro call passing it as an argument) is not a definition.
        let kernel = (l.contains("AK_KERNEL") || l.contains("__global__")) && l.contains("void ");
        let is_def = (l.contains("__device__") || kernel)
            && l.contains('(')
            && !l.trim_start().starts_with('#');
        if !is_def {
            i += 1;
            continue;
        }
        // The name may be on the next line (`AK_KERNEL void __launch_bounds__(256) \`
        // then `name_##SUF(…`, in a macro).
        let mut name = def_name(l);
        if name.is_empty() && i + 1 < lines.len() {
            let joined = format!("{} {}", l.trim_end().trim_end_matches('\\'), lines[i + 1]);
            name = def_name(&joined);
        }
        // The body: from this line to the matching closing brace.
        let mut depth = 0i32;
        let mut started = false;
        let mut body = Vec::new();
        let mut j = i;
        while j < lines.len() {
            let lj = lines[j];
            body.push((j + 1, lj));
            for ch in lj.chars() {
                if ch == '{' {
                    depth += 1;
                    started = true;
                } else if ch == '}' {
                    depth -= 1;
                }
            }
            if (started && depth <= 0) || (!started && lj.trim_end().ends_with(';')) {
                break;
            }
            j += 1;
        }
        let mut wide: BTreeSet<String> = BTreeSet::new();
        for (_, lj) in &body {
            for w in WIDE {
                let mut rest = *lj;
                while let Some(p) = rest.find(w) {
                    let after = rest[p + w.len()..].trim_start();
                    let after = after.trim_start_matches(['*', '&', ' ']);
                    let id = ident_at(after, 0);
                    if !id.is_empty() && id != "const" {
                        wide.insert(id.to_string());
                    }
                    rest = &rest[p + w.len()..];
                }
            }
        }
        let mut calls = BTreeSet::new();
        let mut flagged = Vec::new();
        // Loop bodies: a stack of open braces, each marked whether it opened a loop
        // body (`for (` / `while (` / `do` seen since the last statement).
        let mut braces: Vec<bool> = Vec::new();
        let mut pending_loop = false;
        for (ln, lj) in &body {
            // `do` as a word (`do {`), not `done = …` or `double …`.
            let t = lj.trim_start();
            let is_do = t == "do"
                || t.strip_prefix("do")
                    .is_some_and(|r| r.starts_with(|c: char| c == '{' || c.is_whitespace()));
            let header = lj.contains("for (") || lj.contains("while (") || is_do;
            if header {
                pending_loop = true;
            }
            let in_loop = header || braces.iter().any(|&b| b);
            for ch in lj.chars() {
                match ch {
                    '{' => {
                        braces.push(pending_loop);
                        pending_loop = false;
                    }
                    '}' => {
                        braces.pop();
                    }
                    ';' if !header => pending_loop = false,
                    _ => {}
                }
            }
            // A one-statement loop (`for (...) stmt;` on one line) ends with its line; a
            // header whose parentheses are still open continues on the next line.
            let open = lj.matches('(').count() as i64 - lj.matches(')').count() as i64;
            if header && open <= 0 && lj.trim_end().ends_with(';') {
                pending_loop = false;
            }
            for w in idents(lj) {
                calls.insert((w.to_string(), in_loop));
            }
            let casts =
                lj.contains("(long long)") || lj.contains("(size_t)") || lj.contains("(int64_t)");
            let names_wide = idents(lj).iter().any(|w| wide.contains(*w));
            if (casts || names_wide) && runtime_division(lj) {
                flagged.push((format!("{file}:{ln}"), in_loop));
            }
        }
        calls.retain(|(c, _)| *c != name);
        out.entry(name)
            .or_default()
            .entry(file.to_string())
            .and_modify(|f: &mut Func| {
                f.calls.extend(calls.iter().cloned());
                f.flagged.extend(flagged.iter().cloned());
            })
            .or_insert(Func { calls, flagged });
        i = j + 1;
    }
}

/// What [`div64`] found: per kernel, its flagged lines; and the kernels whose
/// definition it could not find in the sources (a lint that sees no body would pass
/// them vacuously: the audit fails on these).
pub struct Div64 {
    /// Kernel -> flagged `file:line`s.
    pub lines: BTreeMap<String, Vec<String>>,
    /// Kernels with no definition found.
    pub missing: Vec<String>,
}

/// For every kernel family name registered in the ptxas table (`kernels`), the
/// flagged lines of its body and of every function it calls.
pub fn div64(sources: &[(String, String)], kernels: &BTreeSet<String>) -> Div64 {
    let mut funcs = Funcs::new();
    for (file, src) in sources {
        functions(file, src, &mut funcs);
    }
    let mut res = BTreeMap::new();
    let mut missing = Vec::new();
    for k in kernels {
        // Entry points are defined per dtype through a macro (`name_##DT`): look the
        // family up without its suffix too.
        let base = ["_f32", "_f16", "_bf16"]
            .iter()
            .find_map(|s| k.strip_suffix(s))
            .unwrap_or(k);
        let start = if funcs.contains_key(k.as_str()) {
            k.as_str()
        } else if let Some(stripped) = funcs.keys().find(|f| f.as_str() == format!("{base}_")) {
            stripped.as_str()
        } else if funcs.contains_key(base) {
            base
        } else {
            missing.push(k.clone());
            continue;
        };
        // (function, the caller's file, reached from inside a loop): in a function
        // reached from a loop, every flagged line runs per iteration; otherwise only
        // those in its own loops. A call resolves to the definition in the caller's
        // own file when there is one, else to every definition of that name (headers
        // are shared; when in doubt the lint over-reports rather than misses).
        let mut seen = BTreeSet::new();
        let mut stack = vec![(start.to_string(), None::<String>, false)];
        let mut lines = BTreeSet::new();
        while let Some((f, caller_file, looped)) = stack.pop() {
            let Some(defs) = funcs.get(&f) else {
                continue;
            };
            let own = caller_file.as_ref().filter(|cf| defs.contains_key(*cf));
            for (file, func) in defs {
                if own.is_some_and(|cf| cf != file) || !seen.insert((f.clone(), file, looped)) {
                    continue;
                }
                for (line, in_loop) in &func.flagged {
                    if looped || *in_loop {
                        lines.insert(line.clone());
                    }
                }
                for (c, in_loop) in &func.calls {
                    if funcs.contains_key(c) {
                        stack.push((c.clone(), Some(file.clone()), looped || *in_loop));
                    }
                }
            }
        }
        res.insert(k.clone(), lines.into_iter().collect());
    }
    Div64 {
        lines: res,
        missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_skip_launch_bound_attributes() {
        assert_eq!(
            def_name("AK_KERNEL void iieu_fwd_##SUF(const T* x) {"),
            "iieu_fwd_"
        );
        assert_eq!(
            def_name("AK_KERNEL_BOUND(ak_cast::BLOCK) void cast_to_f32_##SUF(const T* in,"),
            "cast_to_f32_"
        );
        assert_eq!(
            def_name("extern \"C\" __global__ __launch_bounds__(256, 3) void k(int n) {"),
            "k"
        );
        assert_eq!(def_name("__device__ void f(int a) {"), "f");
        assert_eq!(
            def_name("AK_KERNEL void __launch_bounds__(256, MB_##SUF) k_##SUF(int n) {"),
            "k_"
        );
    }

    #[test]
    fn a_name_on_the_next_line_is_found() {
        let src = "#define F(S, T) \\\n  AK_KERNEL void __launch_bounds__(256) \\\n      k_##S(long long n) { \\\n    for (long long i = 0; i < n; ++i) { long long q = i % n; } \\\n  }\n";
        let mut funcs = Funcs::new();
        functions("x.cu", src, &mut funcs);
        assert_eq!(
            funcs
                .get("k_")
                .and_then(|d| d.get("x.cu"))
                .map(|f| f.flagged.len()),
            Some(1),
            "{:?}",
            funcs.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_macro_call_mentioning_ak_kernel_is_not_a_definition() {
        let src = "FAMILY(AK_KERNEL, f32)\nAK_KERNEL void k_##S(long long n) {\n  for (long long i = 0; i < n; ++i) { long long q = i / n; }\n}\n";
        let mut funcs = Funcs::new();
        functions("x.cu", src, &mut funcs);
        assert!(!funcs.contains_key("FAMILY"));
        assert_eq!(
            funcs
                .get("k_")
                .and_then(|d| d.get("x.cu"))
                .map(|f| f.flagged.len()),
            Some(1)
        );
    }

    /// Two files each define `helper`; only b.cu's divides by a 64-bit value in a loop.
    /// A kernel calls the helper of its own file: a.cu's kernel is clean, b.cu's is
    /// flagged. A helper defined only in a shared header resolves from every file.
    #[test]
    fn a_call_resolves_to_the_callers_own_file() {
        let a = "__device__ float helper(int n) { return n * 2.0f; }\nAK_KERNEL void ka(int n) { for (int i = 0; i < n; ++i) helper(i); }\n";
        let b = "__device__ float helper(long long n) { for (int i = 0; i < 4; ++i) { long long q = n / i; } return 0.f; }\nAK_KERNEL void kb(int n) { helper(n); }\n";
        let h = "__device__ int shared_helper(long long n, long long d) { return (int)(n / d); }\n";
        let c =
            "AK_KERNEL void kc(long long n) { for (int i = 0; i < 3; ++i) shared_helper(n, i); }\n";
        let sources: Vec<(String, String)> =
            [("a.cu", a), ("b.cu", b), ("common.cuh", h), ("c.cu", c)]
                .iter()
                .map(|(f, s)| (f.to_string(), s.to_string()))
                .collect();
        let kernels: BTreeSet<String> = ["ka", "kb", "kc"].iter().map(|k| k.to_string()).collect();
        let d = div64(&sources, &kernels);
        assert!(d.missing.is_empty());
        assert_eq!(d.lines["ka"], Vec::<String>::new());
        assert_eq!(d.lines["kb"], vec!["b.cu:1".to_string()]);
        assert_eq!(d.lines["kc"], vec!["common.cuh:1".to_string()]);
    }
}
