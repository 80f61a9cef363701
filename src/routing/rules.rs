//! The `custom_rules` routing strategy: a small rule language read from files under `filters/`.
//!
//! A file is a list of `when <condition> use <target>` rules and one final `default use <target>`.
//! It is parsed and type-checked once, at config load, into an expression tree whose facts are
//! pre-resolved enums; per request, [`RuleSet::evaluate`] walks that tree against a [`Facts`]
//! implementation without allocating. The grammar and semantics are documented in
//! `filters/README.md`.

use std::fmt;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A routing config, by slug (written `@slug`; the slug is stored without the `@`).
    Config(String),
    /// A model, as a client would name it (`gpt-4o-mini`, `openai/gpt-4o`, ...).
    Model(String),
}

/// A parse or type error. `line` and `col` are 1-based; `col` counts characters, not bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.col, self.message)
    }
}

impl std::error::Error for RuleError {}

/// Facts about one request. Implemented by the gateway; all lookups must be cheap.
pub trait Facts {
    /// A request tag (`mlx:tags`); `None` reads as `""` in rules.
    fn tag(&self, key: &str) -> Option<&str>;
    /// The end user (`mlx:end_user`); `None` reads as `""` in rules.
    fn end_user(&self) -> Option<&str>;
    /// The model the client asked for, as sent (`gpt-4o`, `@production`, ...).
    fn model(&self) -> &str;
    fn est_input_tokens(&self) -> f64;
    fn est_output_tokens(&self) -> f64;
    fn est_cost_usd(&self) -> f64;
    /// `None` when the project has no budget (or it is not known yet).
    fn budget_remaining_usd(&self) -> Option<f64>;
    /// 0-100; `None` when unknown.
    fn budget_remaining_pct(&self) -> Option<f64>;
    /// `None` when there are no latency samples for the provider.
    fn provider_p50_ms(&self, provider: &str) -> Option<f64>;
    /// 0-1; `None` when there are no samples for the provider.
    fn provider_success_rate(&self, provider: &str) -> Option<f64>;
    /// `None` (no health data) counts as healthy.
    fn provider_healthy(&self, provider: &str) -> Option<bool>;
}

/// A parsed, type-checked rule file.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    default: Target,
    default_at: (u32, u32),
    provider_refs: Vec<(String, u32, u32)>,
}

#[derive(Debug)]
struct Rule {
    cond: Expr,
    target: Target,
    /// Line of the `when` keyword.
    line: u32,
    target_at: (u32, u32),
    /// The condition as written, whitespace and comments collapsed, for decision traces.
    text: String,
}

impl RuleSet {
    /// Parses and type-checks a rule file. On failure returns every error found (at most one
    /// per statement), in source order.
    pub fn parse(text: &str) -> Result<RuleSet, Vec<RuleError>> {
        Parser::new(text).file()
    }

    /// Index of the first matching rule (None = the default) and its target. Must not allocate.
    pub fn evaluate(&self, facts: &dyn Facts) -> (Option<usize>, &Target) {
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.cond.eval(facts) {
                return (Some(i), &rule.target);
            }
        }
        (None, &self.default)
    }

    /// Number of `when` rules (the default is not counted).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Source line (1-based) of rule i, for decision traces ("rule 2 (line 7)"). 0 if out of range.
    pub fn rule_line(&self, i: usize) -> u32 {
        self.rules.get(i).map_or(0, |r| r.line)
    }

    /// The rule's condition as written (normalized whitespace ok), for traces. "" if out of range.
    pub fn rule_text(&self, i: usize) -> &str {
        self.rules.get(i).map_or("", |r| r.text.as_str())
    }

    /// Every target with the line:col where it appears (rules then default) so the config loader can check that configs/models exist and reject cycles.
    pub fn targets(&self) -> impl Iterator<Item = (&Target, u32, u32)> {
        let rules = self.rules.iter().map(|r| (&r.target, r.target_at.0, r.target_at.1));
        rules.chain(std::iter::once((&self.default, self.default_at.0, self.default_at.1)))
    }

    /// Every `provider.<id>.*` reference with line:col, so the loader can reject unknown provider ids.
    pub fn provider_refs(&self) -> impl Iterator<Item = (&str, u32, u32)> {
        self.provider_refs.iter().map(|(id, line, col)| (id.as_str(), *line, *col))
    }
}

// ---------------------------------------------------------------------------------------------
// The compiled form. Types were checked at parse time, so each node knows the type of its
// operands and evaluation never fails.

#[derive(Debug)]
enum Expr {
    Const(bool),
    /// `provider.<id>.healthy`
    Healthy(String),
    Not(Box<Expr>),
    /// `a && b && ...`, flattened so long chains do not make deep trees (recursion on eval and drop).
    All(Box<[Expr]>),
    /// `a || b || ...`, flattened likewise.
    Any(Box<[Expr]>),
    Num(Num, Cmp, Num),
    /// `==` when the flag is true, `!=` otherwise.
    Str(Str, bool, Str),
    Bool(Box<Expr>, bool, Box<Expr>),
    /// `in` when the flag is false, `not in` when true.
    StrIn(Str, Box<[String]>, bool),
    NumIn(Num, Box<[f64]>, bool),
    BoolIn(Box<Expr>, Box<[bool]>, bool),
}

#[derive(Debug)]
enum Num {
    Lit(f64),
    InputTokens,
    OutputTokens,
    CostUsd,
    BudgetUsd,
    BudgetPct,
    P50(String),
    SuccessRate(String),
}

#[derive(Debug)]
enum Str {
    Lit(String),
    Tag(String),
    EndUser,
    Model,
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Expr {
    fn eval(&self, f: &dyn Facts) -> bool {
        match self {
            Expr::Const(b) => *b,
            Expr::Healthy(p) => f.provider_healthy(p).unwrap_or(true),
            Expr::Not(e) => !e.eval(f),
            Expr::All(es) => es.iter().all(|e| e.eval(f)),
            Expr::Any(es) => es.iter().any(|e| e.eval(f)),
            // Any comparison with an unknown number is false, whatever the operator.
            Expr::Num(a, op, b) => match (a.eval(f), b.eval(f)) {
                (Some(x), Some(y)) => op.holds(x, y),
                _ => false,
            },
            Expr::Str(a, eq, b) => (a.eval(f) == b.eval(f)) == *eq,
            Expr::Bool(a, eq, b) => (a.eval(f) == b.eval(f)) == *eq,
            Expr::StrIn(a, list, negated) => {
                let v = a.eval(f);
                list.iter().any(|s| s == v) != *negated
            }
            Expr::NumIn(a, list, negated) => match a.eval(f) {
                Some(v) => list.contains(&v) != *negated,
                None => false,
            },
            Expr::BoolIn(a, list, negated) => list.contains(&a.eval(f)) != *negated,
        }
    }
}

impl Num {
    fn eval(&self, f: &dyn Facts) -> Option<f64> {
        let v = match self {
            Num::Lit(v) => Some(*v),
            Num::InputTokens => Some(f.est_input_tokens()),
            Num::OutputTokens => Some(f.est_output_tokens()),
            Num::CostUsd => Some(f.est_cost_usd()),
            Num::BudgetUsd => f.budget_remaining_usd(),
            Num::BudgetPct => f.budget_remaining_pct(),
            Num::P50(p) => f.provider_p50_ms(p),
            Num::SuccessRate(p) => f.provider_success_rate(p),
        };
        // NaN from a fact source is treated as unknown; otherwise `!=` would hold for it.
        v.filter(|v| !v.is_nan())
    }
}

impl Str {
    fn eval<'a>(&'a self, f: &'a dyn Facts) -> &'a str {
        match self {
            Str::Lit(s) => s,
            Str::Tag(k) => f.tag(k).unwrap_or(""),
            Str::EndUser => f.end_user().unwrap_or(""),
            Str::Model => f.model(),
        }
    }
}

impl Cmp {
    fn holds(self, x: f64, y: f64) -> bool {
        match self {
            Cmp::Eq => x == y,
            Cmp::Ne => x != y,
            Cmp::Lt => x < y,
            Cmp::Le => x <= y,
            Cmp::Gt => x > y,
            Cmp::Ge => x >= y,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing. The lexer is driven by the parser because targets (`openai/gpt-4o`, `...-v1:0`) use
// characters that mean something else, or nothing, inside conditions.

/// Bounds `(` and `!` nesting so a hostile or broken file cannot overflow the stack.
const MAX_DEPTH: u32 = 64;

const VALID_FACTS: &str = "tags.<key>, end_user, model, est_input_tokens, est_output_tokens, \
     est_cost_usd, budget.remaining_usd, budget.remaining_pct, provider.<id>.p50_ms, \
     provider.<id>.success_rate, provider.<id>.healthy";

const KEYWORDS: [&str; 7] = ["when", "use", "default", "in", "not", "true", "false"];

#[derive(Debug, Clone, Copy)]
struct Pos {
    byte: usize,
    line: u32,
    col: u32,
}

impl Pos {
    fn step(self, c: char) -> Pos {
        let byte = self.byte + c.len_utf8();
        if c == '\n' {
            Pos { byte, line: self.line + 1, col: 1 }
        } else {
            Pos { byte, line: self.line, col: self.col + 1 }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// Identifiers and keywords.
    Word,
    Str(String),
    Num(f64),
    Op(&'static str),
    Eof,
}

#[derive(Debug)]
struct Tok {
    kind: Kind,
    start: Pos,
    end: Pos,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Ty {
    Bool,
    Num,
    Str,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Bool => "true/false",
            Ty::Num => "a number",
            Ty::Str => "a string",
        }
    }
}

enum Typed {
    Bool(Expr),
    Num(Num),
    Str(Str),
}

impl Typed {
    fn ty(&self) -> Ty {
        match self {
            Typed::Bool(_) => Ty::Bool,
            Typed::Num(_) => Ty::Num,
            Typed::Str(_) => Ty::Str,
        }
    }
}

/// A parsed operand or sub-expression with its source span, for error messages.
struct Val {
    typed: Typed,
    start: Pos,
    end: Pos,
}

fn err(at: Pos, message: impl Into<String>) -> RuleError {
    RuleError { line: at.line, col: at.col, message: message.into() }
}

fn is_word_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

fn is_slug_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

fn is_model_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-')
}

struct Parser<'s> {
    src: &'s str,
    pos: Pos,
    /// End of the last consumed token: where "missing default" is reported and where a
    /// condition's source text ends.
    last_end: Pos,
    provider_refs: Vec<(String, u32, u32)>,
}

impl<'s> Parser<'s> {
    fn new(src: &'s str) -> Self {
        let start = Pos { byte: 0, line: 1, col: 1 };
        Parser { src, pos: start, last_end: start, provider_refs: Vec::new() }
    }

    fn char_at(&self, p: Pos) -> Option<char> {
        self.src.get(p.byte..).and_then(|s| s.chars().next())
    }

    fn slice(&self, from: Pos, to: Pos) -> &'s str {
        self.src.get(from.byte..to.byte).unwrap_or("")
    }

    fn take_while(&self, mut p: Pos, f: impl Fn(char) -> bool) -> Pos {
        while let Some(c) = self.char_at(p).filter(|c| f(*c)) {
            p = p.step(c);
        }
        p
    }

    /// Skips whitespace and `#` comments.
    fn skip_trivia(&self, mut p: Pos) -> Pos {
        loop {
            match self.char_at(p) {
                Some('#') => p = self.take_while(p, |c| c != '\n'),
                Some(c) if c.is_whitespace() => p = p.step(c),
                _ => return p,
            }
        }
    }

    fn text(&self, t: &Tok) -> &'s str {
        self.slice(t.start, t.end)
    }

    fn is_word(&self, t: &Tok, w: &str) -> bool {
        t.kind == Kind::Word && self.text(t) == w
    }

    fn describe(&self, t: &Tok) -> String {
        match t.kind {
            Kind::Eof => "end of file".to_string(),
            Kind::Str(_) => "a string".to_string(),
            _ => format!("`{}`", self.text(t)),
        }
    }

    /// Quotes a source span for messages; long or multi-line spans are not worth quoting.
    fn quote(&self, v: &Val) -> String {
        let s = self.slice(v.start, v.end);
        if s.chars().count() > 40 || s.contains('\n') {
            "the expression".to_string()
        } else {
            format!("`{s}`")
        }
    }

    /// Lexes one condition-mode token at `from` without consuming it.
    fn scan(&self, from: Pos) -> Result<Tok, RuleError> {
        let start = self.skip_trivia(from);
        let Some(c) = self.char_at(start) else {
            return Ok(Tok { kind: Kind::Eof, start, end: start });
        };
        let tok = |kind, end| Ok(Tok { kind, start, end });
        if is_word_start(c) {
            return tok(Kind::Word, self.take_while(start, is_word_char));
        }
        if c.is_ascii_digit() || c == '-' {
            return self.scan_number(start);
        }
        if c == '"' {
            let (s, end) = self.scan_string(start)?;
            return tok(Kind::Str(s), end);
        }
        let next = self.char_at(start.step(c));
        for op in ["==", "!=", "<=", ">=", "&&", "||"] {
            let mut chars = op.chars();
            if Some(c) == chars.next() && next == chars.next() {
                return tok(Kind::Op(op), start.step(c).step(c));
            }
        }
        // `@` is never valid in a condition; as a token it gets a message that names the
        // context ("expected `use`...") rather than a bare "unexpected character".
        for op in ["<", ">", "!", "(", ")", "[", "]", ",", "@"] {
            if op.starts_with(c) {
                return tok(Kind::Op(op), start.step(c));
            }
        }
        Err(err(
            start,
            match c {
                '=' => "unexpected `=`; compare with `==`".to_string(),
                '&' => "unexpected `&`; write `&&` for \"and\"".to_string(),
                '|' => "unexpected `|`; write `||` for \"or\"".to_string(),
                _ => format!("unexpected character `{}`", c.escape_debug()),
            },
        ))
    }

    fn scan_number(&self, start: Pos) -> Result<Tok, RuleError> {
        let mut p = start;
        if self.char_at(p) == Some('-') {
            p = p.step('-');
            if !self.char_at(p).is_some_and(|c| c.is_ascii_digit()) {
                return Err(err(start, "unexpected `-` (a negative number is written like `-5`)"));
            }
        }
        // Take letters too, so `1e5` or `4o` is one bad number rather than a number and a word.
        let end = self.take_while(p, |c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        let text = self.slice(start, end);
        let digits = self.slice(p, end);
        let (int, frac) = digits.split_once('.').unwrap_or((digits, "0"));
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match text.parse::<f64>() {
            Ok(n) if all_digits(int) && all_digits(frac) => Ok(Tok { kind: Kind::Num(n), start, end }),
            _ => Err(err(
                start,
                format!("invalid number `{text}` (write integers like 20 or decimals like 0.05)"),
            )),
        }
    }

    /// A double-quoted string starting at `start`; returns its value and the position after it.
    fn scan_string(&self, start: Pos) -> Result<(String, Pos), RuleError> {
        // A string may not span lines: an unclosed quote is then reported where it opens,
        // instead of swallowing the rest of the file.
        let unterminated =
            || err(start, "unterminated string (a string ends on its own line; write a newline as \\n)");
        let mut p = start.step('"');
        let mut out = String::new();
        loop {
            match self.char_at(p) {
                None | Some('\n') => return Err(unterminated()),
                Some('"') => return Ok((out, p.step('"'))),
                Some('\\') => {
                    let esc = p.step('\\');
                    let c = match self.char_at(esc) {
                        None | Some('\n') => return Err(unterminated()),
                        Some(c) => c,
                    };
                    out.push(match c {
                        '"' => '"',
                        '\\' => '\\',
                        'n' => '\n',
                        't' => '\t',
                        _ => {
                            return Err(err(
                                p,
                                format!("unknown escape `\\{}` (valid: \\\" \\\\ \\n \\t)", c.escape_debug()),
                            ))
                        }
                    });
                    p = esc.step(c);
                }
                Some(c) => {
                    out.push(c);
                    p = p.step(c);
                }
            }
        }
    }

    fn peek(&self) -> Result<Tok, RuleError> {
        self.scan(self.pos)
    }

    fn bump(&mut self, t: &Tok) {
        self.pos = t.end;
        self.last_end = t.end;
    }

    /// The next token if it is the operator `op`; lexing errors are left for the caller's
    /// next `peek` to report.
    fn at_op(&self, op: &'static str) -> Option<Tok> {
        self.peek().ok().filter(|t| t.kind == Kind::Op(op))
    }

    /// After an error, skips to the next `when` or `default` word. Words are taken as runs of
    /// target characters so that e.g. `openai/when` does not look like a keyword.
    fn recover(&mut self) {
        let mut p = self.pos;
        loop {
            p = self.skip_trivia(p);
            let Some(c) = self.char_at(p) else { break };
            if c == '"' {
                p = match self.scan_string(p) {
                    Ok((_, end)) => end,
                    Err(_) => self.take_while(p.step('"'), |c| c != '\n'),
                };
            } else if is_model_char(c) || c == '@' {
                let end = self.take_while(p.step(c), is_model_char);
                if matches!(self.slice(p, end), "when" | "default") {
                    break;
                }
                p = end;
            } else {
                p = p.step(c);
            }
        }
        self.pos = p;
    }

    fn file(mut self) -> Result<RuleSet, Vec<RuleError>> {
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        let mut default: Option<(Target, (u32, u32))> = None;
        let mut saw_default = false;
        let mut reported_after_default = false;
        loop {
            let tok = match self.peek() {
                Ok(t) => t,
                Err(e) => {
                    errors.push(e);
                    self.recover();
                    continue;
                }
            };
            if tok.kind == Kind::Eof {
                break;
            }
            let result = if self.is_word(&tok, "when") {
                if saw_default && !reported_after_default {
                    reported_after_default = true;
                    errors.push(err(
                        tok.start,
                        "a rule after `default` would never run; `default` must be the last statement",
                    ));
                }
                self.bump(&tok);
                self.rule(tok.start).map(|r| {
                    if !saw_default {
                        rules.push(r);
                    }
                })
            } else if self.is_word(&tok, "default") {
                let duplicate = saw_default;
                if duplicate {
                    errors.push(err(
                        tok.start,
                        "duplicate `default`: a file has exactly one, as its last statement",
                    ));
                }
                saw_default = true;
                self.bump(&tok);
                self.default_stmt().map(|t| {
                    if !duplicate {
                        default = Some(t);
                    }
                })
            } else {
                let found = self.describe(&tok);
                Err(err(tok.start, format!("expected `when` or `default`, found {found}")))
            };
            if let Err(e) = result {
                errors.push(e);
                self.recover();
            }
        }
        if !saw_default {
            errors.push(err(self.last_end, "missing `default use <target>` (the required last statement)"));
        }
        match default {
            Some((default, default_at)) if errors.is_empty() => {
                Ok(RuleSet { rules, default, default_at, provider_refs: self.provider_refs })
            }
            _ => Err(errors),
        }
    }

    fn rule(&mut self, when: Pos) -> Result<Rule, RuleError> {
        let cond_start = self.skip_trivia(self.pos);
        let v = self.expr(0)?;
        let cond = match v.typed {
            Typed::Bool(e) => e,
            Typed::Num(_) => {
                return Err(err(
                    v.start,
                    format!(
                        "a condition must be true or false, but {} is a number; compare it, e.g. with `<` or `>`",
                        self.quote(&v)
                    ),
                ))
            }
            Typed::Str(_) => {
                return Err(err(
                    v.start,
                    format!(
                        "a condition must be true or false, but {} is a string; compare it, e.g. with `==` or `in`",
                        self.quote(&v)
                    ),
                ))
            }
        };
        let text = condense(self.slice(cond_start, self.last_end));
        self.expect_use("after the condition")?;
        let (target, at) = self.target()?;
        Ok(Rule { cond, target, line: when.line, target_at: (at.line, at.col), text })
    }

    fn default_stmt(&mut self) -> Result<(Target, (u32, u32)), RuleError> {
        self.expect_use("after `default`")?;
        let (target, at) = self.target()?;
        Ok((target, (at.line, at.col)))
    }

    fn expect_use(&mut self, context: &str) -> Result<(), RuleError> {
        let t = self.peek()?;
        if self.is_word(&t, "use") {
            self.bump(&t);
            return Ok(());
        }
        if t.kind == Kind::Op("@") {
            return Err(err(t.start, format!("expected `use` {context}, before the target")));
        }
        let hint = match self.text(&t) {
            "and" if t.kind == Kind::Word => " (write `&&` for \"and\")",
            "or" if t.kind == Kind::Word => " (write `||` for \"or\")",
            _ => "",
        };
        Err(err(t.start, format!("expected `use` {context}, found {}{hint}", self.describe(&t))))
    }

    fn target(&mut self) -> Result<(Target, Pos), RuleError> {
        let start = self.skip_trivia(self.pos);
        let expected = "expected a target after `use`: a model such as `gpt-4o-mini` or a routing config such as `@production`";
        let (target, end) = match self.char_at(start) {
            Some('@') => {
                let end = self.take_while(start.step('@'), is_model_char);
                let slug = self.slice(start.step('@'), end);
                if slug.is_empty() {
                    return Err(err(start, "expected a routing config slug after `@`"));
                }
                if !slug.chars().all(is_slug_char) {
                    return Err(err(
                        start,
                        format!("invalid routing config slug `{slug}` (allowed: A-Z a-z 0-9 _ . -)"),
                    ));
                }
                (Target::Config(slug.to_string()), end)
            }
            Some('"') => {
                let (model, end) = self.scan_string(start)?;
                if model.is_empty() {
                    return Err(err(start, "empty model name"));
                }
                (Target::Model(model), end)
            }
            Some(c) if is_model_char(c) => {
                let end = self.take_while(start, is_model_char);
                let word = self.slice(start, end);
                // `when a use` followed by the next rule: the target is missing, not named "when".
                if matches!(word, "when" | "default") {
                    return Err(err(start, format!("{expected}, found `{word}`")));
                }
                (Target::Model(word.to_string()), end)
            }
            Some(c) => return Err(err(start, format!("{expected}, found `{}`", c.escape_debug()))),
            None => return Err(err(start, format!("{expected}, found end of file"))),
        };
        self.pos = end;
        self.last_end = end;
        Ok((target, start))
    }

    fn expr(&mut self, depth: u32) -> Result<Val, RuleError> {
        self.or(depth)
    }

    fn or(&mut self, depth: u32) -> Result<Val, RuleError> {
        let first = self.and(depth)?;
        if self.at_op("||").is_none() {
            return Ok(first);
        }
        let start = first.start;
        let mut items = vec![self.need_bool(first, "||")?];
        while let Some(op) = self.at_op("||") {
            self.bump(&op);
            let v = self.and(depth)?;
            items.push(self.need_bool(v, "||")?);
        }
        Ok(Val { typed: Typed::Bool(Expr::Any(items.into_boxed_slice())), start, end: self.last_end })
    }

    fn and(&mut self, depth: u32) -> Result<Val, RuleError> {
        let first = self.not(depth)?;
        if self.at_op("&&").is_none() {
            return Ok(first);
        }
        let start = first.start;
        let mut items = vec![self.need_bool(first, "&&")?];
        while let Some(op) = self.at_op("&&") {
            self.bump(&op);
            let v = self.not(depth)?;
            items.push(self.need_bool(v, "&&")?);
        }
        Ok(Val { typed: Typed::Bool(Expr::All(items.into_boxed_slice())), start, end: self.last_end })
    }

    fn not(&mut self, depth: u32) -> Result<Val, RuleError> {
        let Some(op) = self.at_op("!") else { return self.cmp(depth) };
        if depth >= MAX_DEPTH {
            return Err(err(op.start, "expression nested too deeply"));
        }
        self.bump(&op);
        let inner = self.not(depth + 1)?;
        let e = self.need_bool(inner, "!")?;
        Ok(Val { typed: Typed::Bool(Expr::Not(Box::new(e))), start: op.start, end: self.last_end })
    }

    fn need_bool(&self, v: Val, op: &str) -> Result<Expr, RuleError> {
        let ty = v.typed.ty();
        match v.typed {
            Typed::Bool(e) => Ok(e),
            _ => Err(err(
                v.start,
                format!("`{op}` needs true/false on both sides, but {} is {}", self.quote(&v), ty.name()),
            )),
        }
    }

    fn cmp(&mut self, depth: u32) -> Result<Val, RuleError> {
        let left = self.operand(depth)?;
        // A lexing error right after an operand is reported as such, not as whatever type
        // error the operand alone would cause (`tags.a = "x"`).
        let t = self.peek()?;
        let start = left.start;
        let expr = match t.kind {
            Kind::Op(op @ ("==" | "!=" | "<" | "<=" | ">" | ">=")) => {
                self.bump(&t);
                let right = self.operand(depth)?;
                self.compare(left, op, right)?
            }
            Kind::Word if self.text(&t) == "in" => {
                self.bump(&t);
                self.list(left, false)?
            }
            Kind::Word if self.text(&t) == "not" => {
                self.bump(&t);
                let t = self.peek()?;
                if !self.is_word(&t, "in") {
                    let found = self.describe(&t);
                    return Err(err(
                        t.start,
                        format!("expected `in` after `not`, found {found} (negate a condition with `!`)"),
                    ));
                }
                self.bump(&t);
                self.list(left, true)?
            }
            _ => return Ok(left),
        };
        if let Ok(t) = self.peek() {
            let chained = matches!(t.kind, Kind::Op("==" | "!=" | "<" | "<=" | ">" | ">="))
                || self.is_word(&t, "in")
                || self.is_word(&t, "not");
            if chained {
                return Err(err(t.start, "comparisons cannot be chained; join them with `&&` or `||`"));
            }
        }
        Ok(Val { typed: Typed::Bool(expr), start, end: self.last_end })
    }

    fn compare(&self, left: Val, op: &str, right: Val) -> Result<Expr, RuleError> {
        let cmp = match op {
            "==" => Cmp::Eq,
            "!=" => Cmp::Ne,
            "<" => Cmp::Lt,
            "<=" => Cmp::Le,
            ">" => Cmp::Gt,
            _ => Cmp::Ge,
        };
        let equality = matches!(cmp, Cmp::Eq | Cmp::Ne);
        let (lt, rt) = (left.typed.ty(), right.typed.ty());
        if !equality && (lt != Ty::Num || rt != Ty::Num) {
            let bad = if lt != Ty::Num { &left } else { &right };
            let what = if lt != Ty::Num { lt } else { rt };
            return Err(err(
                bad.start,
                format!("`{op}` compares numbers, but {} is {}", self.quote(bad), what.name()),
            ));
        }
        if lt != rt {
            return Err(err(
                right.start,
                format!(
                    "`{op}` needs both sides of the same type, but {} is {} and {} is {}",
                    self.quote(&left),
                    lt.name(),
                    self.quote(&right),
                    rt.name()
                ),
            ));
        }
        let eq = matches!(cmp, Cmp::Eq);
        Ok(match (left.typed, right.typed) {
            (Typed::Num(a), Typed::Num(b)) => Expr::Num(a, cmp, b),
            (Typed::Str(a), Typed::Str(b)) => Expr::Str(a, eq, b),
            (Typed::Bool(a), Typed::Bool(b)) => Expr::Bool(Box::new(a), eq, Box::new(b)),
            // Unreachable: the types were checked equal above.
            _ => Expr::Const(false),
        })
    }

    /// `[ literal, ... ]` after `in` / `not in`; items must have the left side's type.
    fn list(&mut self, left: Val, negated: bool) -> Result<Expr, RuleError> {
        let open = self.peek()?;
        if open.kind != Kind::Op("[") {
            let found = self.describe(&open);
            return Err(err(open.start, format!("expected `[` to start the list, found {found}")));
        }
        self.bump(&open);
        let want = left.typed.ty();
        let (mut strs, mut nums, mut bools) = (Vec::new(), Vec::new(), Vec::new());
        let mut count = 0;
        loop {
            let t = self.peek()?;
            if t.kind == Kind::Op("]") {
                if count == 0 {
                    return Err(err(t.start, "an `in` list needs at least one value"));
                }
                // A trailing comma is allowed, for lists written one item per line.
                self.bump(&t);
                break;
            }
            let got = match &t.kind {
                Kind::Str(s) => {
                    strs.push(s.clone());
                    Ty::Str
                }
                Kind::Num(n) => {
                    nums.push(*n);
                    Ty::Num
                }
                Kind::Word if matches!(self.text(&t), "true" | "false") => {
                    bools.push(self.text(&t) == "true");
                    Ty::Bool
                }
                _ => {
                    let found = self.describe(&t);
                    return Err(err(
                        t.start,
                        format!("expected a string, number, true or false in the list, found {found}"),
                    ));
                }
            };
            if got != want {
                return Err(err(
                    t.start,
                    format!(
                        "the list for {} ({}) cannot hold {}",
                        self.quote(&left),
                        want.name(),
                        match got {
                            Ty::Bool => "true/false",
                            Ty::Num => "numbers",
                            Ty::Str => "strings",
                        }
                    ),
                ));
            }
            count += 1;
            self.bump(&t);
            let sep = self.peek()?;
            match sep.kind {
                Kind::Op(",") => self.bump(&sep),
                Kind::Op("]") => {
                    self.bump(&sep);
                    break;
                }
                _ => {
                    let found = self.describe(&sep);
                    return Err(err(sep.start, format!("expected `,` or `]` in the list, found {found}")));
                }
            }
        }
        Ok(match left.typed {
            Typed::Str(a) => Expr::StrIn(a, strs.into_boxed_slice(), negated),
            Typed::Num(a) => Expr::NumIn(a, nums.into_boxed_slice(), negated),
            Typed::Bool(a) => Expr::BoolIn(Box::new(a), bools.into_boxed_slice(), negated),
        })
    }

    fn operand(&mut self, depth: u32) -> Result<Val, RuleError> {
        let t = self.peek()?;
        let typed = match &t.kind {
            Kind::Str(s) => Typed::Str(Str::Lit(s.clone())),
            Kind::Num(n) => Typed::Num(Num::Lit(*n)),
            Kind::Op("(") => {
                if depth >= MAX_DEPTH {
                    return Err(err(t.start, "expression nested too deeply"));
                }
                self.bump(&t);
                let inner = self.expr(depth + 1)?;
                let close = self.peek()?;
                if close.kind != Kind::Op(")") {
                    let found = self.describe(&close);
                    return Err(err(
                        close.start,
                        format!(
                            "expected `)` to close the `(` at {}:{}, found {found}",
                            t.start.line, t.start.col
                        ),
                    ));
                }
                self.bump(&close);
                return Ok(Val { typed: inner.typed, start: t.start, end: close.end });
            }
            Kind::Word => match self.text(&t) {
                "true" => Typed::Bool(Expr::Const(true)),
                "false" => Typed::Bool(Expr::Const(false)),
                "not" => {
                    return Err(err(t.start, "`not` only appears in `not in`; negate a condition with `!`"))
                }
                w if KEYWORDS.contains(&w) => {
                    return Err(err(t.start, format!("expected a value, found the keyword `{w}`")))
                }
                w => self.fact(w, t.start)?,
            },
            _ => {
                let found = self.describe(&t);
                return Err(err(
                    t.start,
                    format!("expected a value (a fact such as `tags.team`, a string, a number, true, false or `(`), found {found}"),
                ));
            }
        };
        self.bump(&t);
        Ok(Val { typed, start: t.start, end: t.end })
    }

    /// Resolves an identifier to its fact once, here, so evaluation never looks names up.
    fn fact(&mut self, name: &str, at: Pos) -> Result<Typed, RuleError> {
        Ok(match name {
            "end_user" => Typed::Str(Str::EndUser),
            "model" => Typed::Str(Str::Model),
            "est_input_tokens" => Typed::Num(Num::InputTokens),
            "est_output_tokens" => Typed::Num(Num::OutputTokens),
            "est_cost_usd" => Typed::Num(Num::CostUsd),
            "budget.remaining_usd" => Typed::Num(Num::BudgetUsd),
            "budget.remaining_pct" => Typed::Num(Num::BudgetPct),
            _ => {
                if let Some(key) = name.strip_prefix("tags.") {
                    if key.is_empty() {
                        return Err(err(at, "missing tag key after `tags.`"));
                    }
                    return Ok(Typed::Str(Str::Tag(key.to_string())));
                }
                if let Some(rest) = name.strip_prefix("provider.") {
                    // The id runs to the last dot, so provider ids may themselves contain dots.
                    let Some((id, field)) = rest.rsplit_once('.').filter(|(id, _)| !id.is_empty()) else {
                        return Err(err(
                            at,
                            format!("`{name}` is not a provider fact; write provider.<id>.p50_ms, provider.<id>.success_rate or provider.<id>.healthy"),
                        ));
                    };
                    let typed = match field {
                        "p50_ms" => Typed::Num(Num::P50(id.to_string())),
                        "success_rate" => Typed::Num(Num::SuccessRate(id.to_string())),
                        "healthy" => Typed::Bool(Expr::Healthy(id.to_string())),
                        _ => {
                            return Err(err(
                                at,
                                format!(
                                    "unknown provider fact `{field}` (valid: p50_ms, success_rate, healthy)"
                                ),
                            ))
                        }
                    };
                    self.provider_refs.push((id.to_string(), at.line, at.col));
                    return Ok(typed);
                }
                return Err(err(at, format!("unknown identifier `{name}` (valid: {VALID_FACTS})")));
            }
        })
    }
}

/// Collapses whitespace and comments in a condition's source to single spaces (strings kept
/// verbatim), so multi-line rules read on one line in traces.
fn condense(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut chars = src.chars();
    let mut space = false;
    while let Some(c) = chars.next() {
        if c == '#' {
            for c in chars.by_ref() {
                if c == '\n' {
                    break;
                }
            }
            space = true;
            continue;
        }
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.push(c);
        if c == '"' {
            while let Some(c) = chars.next() {
                out.push(c);
                match c {
                    '\\' => out.extend(chars.next()),
                    '"' => break,
                    _ => {}
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct F {
        tags: HashMap<&'static str, &'static str>,
        end_user: Option<&'static str>,
        model: &'static str,
        input: f64,
        output: f64,
        cost: f64,
        budget_usd: Option<f64>,
        budget_pct: Option<f64>,
        p50: HashMap<&'static str, f64>,
        success: HashMap<&'static str, f64>,
        healthy: HashMap<&'static str, bool>,
    }

    impl Facts for F {
        fn tag(&self, key: &str) -> Option<&str> {
            self.tags.get(key).copied()
        }
        fn end_user(&self) -> Option<&str> {
            self.end_user
        }
        fn model(&self) -> &str {
            self.model
        }
        fn est_input_tokens(&self) -> f64 {
            self.input
        }
        fn est_output_tokens(&self) -> f64 {
            self.output
        }
        fn est_cost_usd(&self) -> f64 {
            self.cost
        }
        fn budget_remaining_usd(&self) -> Option<f64> {
            self.budget_usd
        }
        fn budget_remaining_pct(&self) -> Option<f64> {
            self.budget_pct
        }
        fn provider_p50_ms(&self, provider: &str) -> Option<f64> {
            self.p50.get(provider).copied()
        }
        fn provider_success_rate(&self, provider: &str) -> Option<f64> {
            self.success.get(provider).copied()
        }
        fn provider_healthy(&self, provider: &str) -> Option<bool> {
            self.healthy.get(provider).copied()
        }
    }

    fn parse(src: &str) -> RuleSet {
        match RuleSet::parse(src) {
            Ok(rs) => rs,
            Err(errs) => panic!("unexpected errors in {src:?}: {errs:?}"),
        }
    }

    /// Whether `cond` holds for `f`.
    fn holds(cond: &str, f: &F) -> bool {
        let rs = parse(&format!("when {cond} use @hit\ndefault use @miss"));
        rs.evaluate(f).0 == Some(0)
    }

    fn errors(src: &str) -> Vec<RuleError> {
        match RuleSet::parse(src) {
            Ok(_) => panic!("expected errors in {src:?}"),
            Err(errs) => errs,
        }
    }

    /// The single error for `src`, as (line, col, message).
    fn one_error(src: &str) -> (u32, u32, String) {
        let errs = errors(src);
        assert_eq!(errs.len(), 1, "{errs:?}");
        (errs[0].line, errs[0].col, errs[0].message.clone())
    }

    fn tags(pairs: &[(&'static str, &'static str)]) -> F {
        F { tags: pairs.iter().copied().collect(), ..F::default() }
    }

    #[test]
    fn string_equality_and_missing_tag() {
        let f = tags(&[("tenant", "enterprise")]);
        assert!(holds(r#"tags.tenant == "enterprise""#, &f));
        assert!(!holds(r#"tags.tenant == "Enterprise""#, &f));
        assert!(holds(r#"tags.tenant != "free""#, &f));
        assert!(holds(r#"tags.missing == """#, &f));
        assert!(!holds(r#"tags.missing != """#, &f));
        assert!(holds(r#""a" == "a""#, &f));
        assert!(holds(r#"tags.tenant == tags.tenant"#, &f));
    }

    #[test]
    fn end_user_and_model() {
        let f = F { end_user: Some("alice"), model: "gpt-4o", ..F::default() };
        assert!(holds(r#"end_user == "alice""#, &f));
        assert!(holds(r#"model == "gpt-4o""#, &f));
        assert!(holds(r#"end_user == """#, &F::default()));
    }

    #[test]
    fn numeric_operators() {
        let f = F { input: 1000.0, output: 200.0, cost: 0.05, ..F::default() };
        assert!(holds("est_input_tokens == 1000", &f));
        assert!(holds("est_input_tokens != 999", &f));
        assert!(holds("est_output_tokens < 201", &f));
        assert!(!holds("est_output_tokens < 200", &f));
        assert!(holds("est_output_tokens <= 200", &f));
        assert!(holds("est_cost_usd > 0.049", &f));
        assert!(!holds("est_cost_usd > 0.05", &f));
        assert!(holds("est_cost_usd >= 0.05", &f));
        assert!(holds("0.01 < est_cost_usd", &f));
    }

    #[test]
    fn negative_and_decimal_numbers() {
        let f = F { cost: -0.5, budget_usd: Some(-12.25), ..F::default() };
        assert!(holds("est_cost_usd == -0.5", &f));
        assert!(holds("est_cost_usd>-1", &f));
        assert!(holds("budget.remaining_usd < -12", &f));
        assert!(holds("budget.remaining_usd == -12.25", &f));
        assert!(holds("-3 < 2.5", &f));
    }

    #[test]
    fn unknown_numbers_make_every_comparison_false() {
        let f = F::default();
        for op in ["==", "!=", "<", "<=", ">", ">="] {
            assert!(!holds(&format!("budget.remaining_pct {op} 20"), &f), "{op}");
            assert!(!holds(&format!("20 {op} budget.remaining_usd"), &f), "{op}");
            assert!(!holds(&format!("provider.openai.p50_ms {op} 1500"), &f), "{op}");
            assert!(!holds(&format!("provider.openai.success_rate {op} 0.9"), &f), "{op}");
        }
        assert!(holds("!(budget.remaining_pct < 20)", &f));
        assert!(!holds("budget.remaining_pct in [20]", &f));
        assert!(!holds("budget.remaining_pct not in [20]", &f));
        // NaN from a fact source is unknown too.
        let nan = F { budget_pct: Some(f64::NAN), ..F::default() };
        assert!(!holds("budget.remaining_pct != 20", &nan));
    }

    #[test]
    fn budget_and_provider_facts() {
        let f = F {
            budget_usd: Some(40.0),
            budget_pct: Some(15.0),
            p50: [("openai", 1600.0)].into(),
            success: [("anthropic", 0.97)].into(),
            healthy: [("anthropic", false), ("openai", true)].into(),
            ..F::default()
        };
        assert!(holds("budget.remaining_pct < 20", &f));
        assert!(holds("budget.remaining_usd >= 40", &f));
        assert!(holds("provider.openai.p50_ms > 1500", &f));
        assert!(holds("provider.anthropic.success_rate > 0.95", &f));
        assert!(holds("provider.openai.healthy", &f));
        assert!(!holds("provider.anthropic.healthy", &f));
        assert!(holds("!provider.anthropic.healthy", &f));
        // No health data: presumed healthy.
        assert!(holds("provider.local.healthy", &f));
        assert!(holds("provider.anthropic.healthy == false", &f));
        assert!(holds("provider.openai.healthy != provider.anthropic.healthy", &f));
    }

    #[test]
    fn dotted_provider_ids() {
        let f = F { p50: [("eu.openai", 80.0)].into(), ..F::default() };
        assert!(holds("provider.eu.openai.p50_ms < 100", &f));
        let rs = parse("when provider.eu.openai.healthy use x\ndefault use y");
        assert_eq!(rs.provider_refs().collect::<Vec<_>>(), vec![("eu.openai", 1, 6)]);
    }

    #[test]
    fn boolean_operators_and_literals() {
        let f = F::default();
        assert!(holds("true", &f));
        assert!(!holds("false", &f));
        assert!(holds("true && true", &f));
        assert!(!holds("true && false", &f));
        assert!(holds("false || true", &f));
        assert!(!holds("false || false", &f));
        assert!(holds("!false", &f));
        assert!(holds("!!true", &f));
        assert!(holds("true == true", &f));
        assert!(holds("true != false", &f));
        assert!(holds("true && true && true && true", &f));
        assert!(!holds("true && true && false && true", &f));
        assert!(holds("false || false || false || true", &f));
    }

    #[test]
    fn precedence() {
        let f = F::default();
        // `a || b && c` is `a || (b && c)`.
        assert!(holds("true || false && false", &f));
        assert!(holds("false && false || true", &f));
        assert!(!holds("(true || false) && false", &f));
        // `!` binds tighter than `&&`/`||` but looser than comparisons.
        assert!(!holds("!true || false", &f));
        assert!(holds("!false && true", &f));
        assert!(holds("!1 == 2", &f));
        assert!(!holds("!(true || true) || false", &f));
        assert!(holds("((((true))))", &f));
        assert!(holds("(1 < 2) == true", &f));
    }

    #[test]
    fn in_and_not_in() {
        let f = F {
            end_user: Some("bob"),
            input: 3.0,
            tags: [("tier", "gold")].into(),
            healthy: [("openai", false)].into(),
            ..F::default()
        };
        assert!(holds(r#"end_user in ["alice", "bob"]"#, &f));
        assert!(!holds(r#"end_user in ["alice"]"#, &f));
        assert!(holds(r#"end_user not in ["alice"]"#, &f));
        assert!(!holds(r#"end_user not in ["alice", "bob"]"#, &f));
        assert!(holds("est_input_tokens in [1, 2, 3]", &f));
        assert!(holds("est_input_tokens not in [1, -3.5]", &f));
        assert!(holds("provider.openai.healthy in [false]", &f));
        assert!(holds("tags.missing in [\"\"]", &f));
        assert!(holds("tags.tier in [\n  \"gold\",\n  \"platinum\",  # trailing comma ok\n]", &f));
        assert!(holds(r#"end_user in ["x"] || tags.tier in ["gold"]"#, &f));
    }

    #[test]
    fn string_escapes() {
        let f = tags(&[("q", "say \"hi\"\\\n\t")]);
        assert!(holds(r#"tags.q == "say \"hi\"\\\n\t""#, &f));
        assert!(holds("\"#not a comment\" == \"#not a comment\"", &f));
        assert!(holds("\"é ü\" == \"é ü\"", &f));
    }

    #[test]
    fn first_match_wins_and_default() {
        let rs = parse(
            r#"
            when tags.tier == "gold" use @premium
            when tags.tier == "gold" use @never
            when est_cost_usd > 1 use gpt-4o-mini
            default use @production
            "#,
        );
        assert_eq!(rs.len(), 3);
        assert!(!rs.is_empty());
        let gold = tags(&[("tier", "gold")]);
        assert_eq!(rs.evaluate(&gold), (Some(0), &Target::Config("premium".into())));
        let pricey = F { cost: 2.0, ..F::default() };
        assert_eq!(rs.evaluate(&pricey), (Some(2), &Target::Model("gpt-4o-mini".into())));
        assert_eq!(rs.evaluate(&F::default()), (None, &Target::Config("production".into())));
    }

    #[test]
    fn only_a_default() {
        let rs = parse("default use openai/gpt-4o");
        assert!(rs.is_empty());
        assert_eq!(rs.len(), 0);
        assert_eq!(rs.evaluate(&F::default()), (None, &Target::Model("openai/gpt-4o".into())));
        assert_eq!(rs.rule_line(0), 0);
        assert_eq!(rs.rule_text(0), "");
    }

    #[test]
    fn targets_of_every_form() {
        let rs = parse(
            "when true use @prod-eu.v2\n\
             when true use anthropic.claude-3-5-haiku-20241022-v1:0\n\
             when true use \"my model\"\n\
             default use openai/gpt-4o#comment",
        );
        let targets: Vec<_> = rs.targets().collect();
        assert_eq!(
            targets,
            vec![
                (&Target::Config("prod-eu.v2".into()), 1, 15),
                (&Target::Model("anthropic.claude-3-5-haiku-20241022-v1:0".into()), 2, 15),
                (&Target::Model("my model".into()), 3, 15),
                (&Target::Model("openai/gpt-4o".into()), 4, 13),
            ]
        );
    }

    #[test]
    fn multi_line_rules_comments_and_traces() {
        let src = "# header comment\n\
                   \n\
                   when est_cost_usd > 0.05   # expensive\n\
                   \x20 && tags.feature == \"summarize  #x\"\n\
                   \x20 use gpt-4o-mini\n\
                   when (end_user in [\"alice\",\"bob\"]) use @b # trailing\n\
                   default\n use\n @production\n# end";
        let rs = parse(src);
        assert_eq!(rs.len(), 2);
        assert_eq!(rs.rule_line(0), 3);
        assert_eq!(rs.rule_text(0), "est_cost_usd > 0.05 && tags.feature == \"summarize  #x\"");
        assert_eq!(rs.rule_line(1), 6);
        assert_eq!(rs.rule_text(1), "(end_user in [\"alice\",\"bob\"])");
        let f = F { cost: 0.1, tags: [("feature", "summarize  #x")].into(), ..F::default() };
        assert_eq!(rs.evaluate(&f).0, Some(0));
        assert_eq!(rs.targets().last(), Some((&Target::Config("production".into()), 9, 2)));
    }

    #[test]
    fn provider_refs_are_listed() {
        let rs = parse(
            "when provider.openai.p50_ms > 1 || !provider.anthropic.healthy use x\n\
             when provider.openai.success_rate < 0.9 use y\n\
             default use z",
        );
        let refs: Vec<_> = rs.provider_refs().collect();
        assert_eq!(refs, vec![("openai", 1, 6), ("anthropic", 1, 37), ("openai", 2, 6)]);
    }

    #[test]
    fn the_readme_example() {
        let rs = parse(
            r#"
# comments run from '#' to end of line
when tags.tenant == "enterprise" use @premium
when budget.remaining_pct < 20 use @cheap
when est_cost_usd > 0.05 && tags.feature == "summarize"
  use gpt-4o-mini
when end_user in ["alice", "bob"] || !provider.anthropic.healthy use openai/gpt-4o
when provider.openai.p50_ms > 1500 use anthropic/claude-haiku-4-5
default use @production
"#,
        );
        assert_eq!(rs.len(), 5);
        let f = F { end_user: Some("bob"), ..F::default() };
        assert_eq!(rs.evaluate(&f), (Some(3), &Target::Model("openai/gpt-4o".into())));
        let f = F { p50: [("openai", 2000.0)].into(), ..F::default() };
        assert_eq!(rs.evaluate(&f).0, Some(4));
        assert_eq!(rs.rule_line(2), 5);
    }

    #[test]
    fn ten_rules() {
        let mut src = String::new();
        for i in 0..9 {
            src.push_str(&format!(
                "when tags.tier == \"t{i}\" && est_cost_usd < 1 || provider.p{i}.p50_ms > 100 use @c{i}\n"
            ));
        }
        src.push_str("when budget.remaining_pct < 50 && provider.openai.healthy use @last\ndefault use @d\n");
        let rs = parse(&src);
        assert_eq!(rs.len(), 10);
        let f = F { budget_pct: Some(10.0), ..F::default() };
        for _ in 0..1000 {
            assert_eq!(rs.evaluate(&f), (Some(9), &Target::Config("last".into())));
        }
        let f = tags(&[("tier", "t4")]);
        assert_eq!(rs.evaluate(&f), (Some(4), &Target::Config("c4".into())));
        let f = F { p50: [("p7", 101.0)].into(), ..F::default() };
        assert_eq!(rs.evaluate(&f).0, Some(7));
        assert_eq!(rs.evaluate(&F::default()).0, None);
        assert_eq!(rs.rule_line(9), 10);
    }

    #[test]
    fn example_files_parse() {
        for (name, src) in [
            ("tenants.rules", include_str!("../../filters/examples/tenants.rules")),
            ("budget_guard.rules", include_str!("../../filters/examples/budget_guard.rules")),
            ("latency_failover.rules", include_str!("../../filters/examples/latency_failover.rules")),
        ] {
            if let Err(errs) = RuleSet::parse(src) {
                panic!("filters/examples/{name}: {errs:?}");
            }
        }
    }

    #[test]
    fn display_is_line_col_message() {
        let e = RuleError { line: 3, col: 17, message: "boom".into() };
        assert_eq!(e.to_string(), "3:17: boom");
    }

    // ---- errors -------------------------------------------------------------------------------

    #[test]
    fn error_unknown_identifier() {
        let (line, col, msg) = one_error("when tags.a == \"b\"\n  && budget.left > 2 use b\ndefault use c");
        assert_eq!((line, col), (2, 6));
        assert!(msg.starts_with("unknown identifier `budget.left` (valid: tags.<key>, end_user,"), "{msg}");
        assert!(msg.ends_with("provider.<id>.healthy)"), "{msg}");
        let (line, col, msg) = one_error("when provider.openai.latency > 1 use a\ndefault use b");
        assert_eq!((line, col), (1, 6));
        assert!(msg.contains("unknown provider fact `latency`"), "{msg}");
        let (line, col, _) = one_error("when provider.openai use a\ndefault use b");
        assert_eq!((line, col), (1, 6));
        let (line, col, msg) = one_error("when tags. == \"\" use a\ndefault use b");
        assert_eq!((line, col, msg.as_str()), (1, 6, "missing tag key after `tags.`"));
    }

    #[test]
    fn errors_resume_at_next_statement() {
        let errs = errors(
            "when x == 1 use a\nwhen y == 2 use openai/when\nwhen model == \"m\" use ok\ndefault use c",
        );
        let at: Vec<_> = errs.iter().map(|e| (e.line, e.col)).collect();
        assert_eq!(at, vec![(1, 6), (2, 6)]);
    }

    #[test]
    fn error_type_mismatch() {
        let (line, col, msg) = one_error("when tags.a > 3 use y\ndefault use x");
        assert_eq!((line, col), (1, 6));
        assert_eq!(msg, "`>` compares numbers, but `tags.a` is a string");
        let (line, col, msg) = one_error("when 3 <= end_user use y\ndefault use x");
        assert_eq!((line, col), (1, 11));
        assert_eq!(msg, "`<=` compares numbers, but `end_user` is a string");
        let (line, col, msg) = one_error("when tags.a == 3 use y\ndefault use x");
        assert_eq!((line, col), (1, 16));
        assert_eq!(
            msg,
            "`==` needs both sides of the same type, but `tags.a` is a string and `3` is a number"
        );
        let (line, col, msg) = one_error("when est_cost_usd && true use y\ndefault use x");
        assert_eq!((line, col), (1, 6));
        assert_eq!(msg, "`&&` needs true/false on both sides, but `est_cost_usd` is a number");
        let (line, col, _) = one_error("when true || \"x\" use y\ndefault use x");
        assert_eq!((line, col), (1, 14));
        let (line, col, msg) = one_error("when !model use y\ndefault use x");
        assert_eq!((line, col), (1, 7));
        assert_eq!(msg, "`!` needs true/false on both sides, but `model` is a string");
        let (line, col, msg) = one_error("when end_user in [\"a\", 2] use y\ndefault use x");
        assert_eq!((line, col), (1, 24));
        assert_eq!(msg, "the list for `end_user` (a string) cannot hold numbers");
    }

    #[test]
    fn error_non_bool_condition() {
        let (line, col, msg) = one_error("when\n  tags.tier use @x\ndefault use @y");
        assert_eq!((line, col), (2, 3));
        assert!(msg.starts_with("a condition must be true or false, but `tags.tier` is a string"), "{msg}");
        let (line, col, msg) = one_error("when (est_cost_usd) use @x\ndefault use @y");
        assert_eq!((line, col), (1, 6));
        assert!(msg.contains("`(est_cost_usd)` is a number"), "{msg}");
    }

    #[test]
    fn error_unterminated_string() {
        let errs = errors("when tags.a == \"abc use x\nwhen true use y\ndefault use z");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!((errs[0].line, errs[0].col), (1, 16));
        assert!(errs[0].message.starts_with("unterminated string"));
        let (line, col, _) = one_error("when true use y\ndefault use \"abc");
        assert_eq!((line, col), (2, 13));
        let (line, col, msg) = one_error("when tags.a == \"a\\qb\" use y\ndefault use z");
        assert_eq!((line, col), (1, 18));
        assert!(msg.starts_with("unknown escape `\\q`"), "{msg}");
    }

    #[test]
    fn error_missing_default() {
        let (line, col, msg) = one_error("when true use @a\nwhen false use @b\n\n# trailing comment\n");
        assert_eq!((line, col), (2, 18));
        assert_eq!(msg, "missing `default use <target>` (the required last statement)");
        assert_eq!(one_error(""), (1, 1, msg.clone()));
        assert_eq!(one_error("# only a comment\n").0, 1);
    }

    #[test]
    fn error_statement_after_default() {
        let (line, col, msg) = one_error("default use @a\nwhen true use @b\nwhen true use @c");
        assert_eq!((line, col), (2, 1));
        assert!(msg.contains("`default` must be the last statement"), "{msg}");
        let (line, col, msg) = one_error("default use @a\n  default use @b");
        assert_eq!((line, col), (2, 3));
        assert!(msg.starts_with("duplicate `default`"), "{msg}");
        let (line, col, msg) = one_error("default use @a @b");
        assert_eq!((line, col), (1, 16));
        assert_eq!(msg, "expected `when` or `default`, found `@`");
    }

    #[test]
    fn error_missing_use() {
        let (line, col, msg) = one_error("when tags.a == \"b\" @x\ndefault use @y");
        assert_eq!((line, col), (1, 20));
        assert_eq!(msg, "expected `use` after the condition, before the target");
        let errs = errors("when tags.a == \"b\"\nwhen true use gpt-4o\ndefault use @y");
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].line, errs[0].col), (2, 1));
        assert_eq!(errs[0].message, "expected `use` after the condition, found `when`");
        let (line, col, msg) = one_error("when true and false use a\ndefault use b");
        assert_eq!((line, col), (1, 11));
        assert!(msg.ends_with("(write `&&` for \"and\")"), "{msg}");
        let (line, col, msg) = one_error("when true use a\ndefault @b");
        assert_eq!((line, col), (2, 9));
        assert_eq!(msg, "expected `use` after `default`, before the target");
        let (line, col, msg) = one_error("when true use\nwhen false use b\ndefault use c");
        assert_eq!((line, col), (2, 1));
        assert!(msg.starts_with("expected a target after `use`"), "{msg}");
        let (line, col, msg) = one_error("when true use a\ndefault use");
        assert_eq!((line, col), (2, 12));
        assert!(msg.ends_with("found end of file"), "{msg}");
    }

    #[test]
    fn error_bad_character() {
        let (line, col, msg) = one_error("when true use a\nwhen tags.a == \"x\" $ use b\ndefault use c");
        assert_eq!((line, col), (2, 20));
        assert_eq!(msg, "unexpected character `$`");
        let (line, col, msg) = one_error("when tags.a = \"x\" use b\ndefault use c");
        assert_eq!((line, col), (1, 13));
        assert_eq!(msg, "unexpected `=`; compare with `==`");
        let (line, col, _) = one_error("when true & false use b\ndefault use c");
        assert_eq!((line, col), (1, 11));
        let (line, col, _) = one_error("when é use b\ndefault use c");
        assert_eq!((line, col), (1, 6));
        let (line, col, msg) = one_error("when true use a\n% default use c");
        assert_eq!((line, col), (2, 1));
        assert_eq!(msg, "unexpected character `%`");
        let (line, col, msg) = one_error("when true use a\nwhen true use b)\ndefault use c");
        assert_eq!((line, col), (2, 16));
        assert_eq!(msg, "expected `when` or `default`, found `)`");
    }

    #[test]
    fn error_columns_count_characters() {
        let (line, col, _) = one_error("when \"ééé\" == 1 use b\ndefault use c");
        assert_eq!((line, col), (1, 15));
    }

    #[test]
    fn error_syntax_misc() {
        let (_, col, msg) = one_error("when 1e5 > 2 use b\ndefault use c");
        assert_eq!(col, 6);
        assert!(msg.starts_with("invalid number `1e5`"), "{msg}");
        let (_, col, msg) = one_error("when 1.2.3 > 2 use b\ndefault use c");
        assert_eq!(col, 6);
        assert!(msg.starts_with("invalid number"), "{msg}");
        let (_, col, _) = one_error("when - 1 > 2 use b\ndefault use c");
        assert_eq!(col, 6);
        let (_, col, msg) = one_error("when (true use b\ndefault use c");
        assert_eq!(col, 12);
        assert_eq!(msg, "expected `)` to close the `(` at 1:6, found `use`");
        let (_, col, msg) = one_error("when 1 < 2 < 3 use b\ndefault use c");
        assert_eq!(col, 12);
        assert!(msg.starts_with("comparisons cannot be chained"), "{msg}");
        let (_, col, msg) = one_error("when end_user in [] use b\ndefault use c");
        assert_eq!(col, 19);
        assert_eq!(msg, "an `in` list needs at least one value");
        let (_, col, _) = one_error("when end_user in \"a\" use b\ndefault use c");
        assert_eq!(col, 18);
        let (_, col, _) = one_error("when end_user not [\"a\"] use b\ndefault use c");
        assert_eq!(col, 19);
        let (_, col, _) = one_error("when end_user in [\"a\" \"b\"] use b\ndefault use c");
        assert_eq!(col, 23);
        let (_, col, msg) = one_error("when not true use b\ndefault use c");
        assert_eq!(col, 6);
        assert!(msg.contains("negate a condition with `!`"), "{msg}");
        let (_, col, msg) = one_error("when use b\ndefault use c");
        assert_eq!(col, 6);
        assert_eq!(msg, "expected a value, found the keyword `use`");
        let (_, col, _) = one_error("when true use @\ndefault use c");
        assert_eq!(col, 15);
        let (_, col, msg) = one_error("when true use @a/b\ndefault use c");
        assert_eq!(col, 15);
        assert!(msg.starts_with("invalid routing config slug `a/b`"), "{msg}");
        let (_, col, _) = one_error("when true use \"\"\ndefault use c");
        assert_eq!(col, 15);
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("when {}true{} use a\ndefault use b", "(".repeat(500), ")".repeat(500));
        let errs = errors(&deep);
        assert_eq!(errs[0].message, "expression nested too deeply");
        let bangs = format!("when {}true use a\ndefault use b", "!".repeat(500));
        assert_eq!(errors(&bangs)[0].message, "expression nested too deeply");
        let ok = format!("when {}true{} use a\ndefault use b", "(".repeat(60), ")".repeat(60));
        assert!(RuleSet::parse(&ok).is_ok());
        // Long flat chains are fine: they do not nest.
        let chain = format!("when true{} use a\ndefault use b", " && true".repeat(5000));
        assert_eq!(parse(&chain).evaluate(&F::default()).0, Some(0));
    }

    #[test]
    fn several_errors_are_collected() {
        let errs = errors(
            "when tags.a > 1 use a\n\
             when nope use b\n\
             when true use c\n\
             when \"x\" use d\n\
             default use e\n\
             default use f\n",
        );
        let at: Vec<_> = errs.iter().map(|e| (e.line, e.col)).collect();
        assert_eq!(at, vec![(1, 6), (2, 6), (4, 6), (6, 1)]);
    }
}
