//! Audience expressions: CEL, with a typed fast path for the common shapes.
//!
//! Every audience is compiled by the `cel` crate, and CEL's result is the meaning. Measured at
//! 1,000 campaigns (BENCHMARKS.md, Offers), evaluating CEL costs about 1.5 µs per audience plus
//! building the expression context (the profile and KPIs as CEL values) once per decision,
//! which put the decision's p99 too close to the 1 ms target. So at compile time an expression
//! made only of the common shapes is also translated into [`Fast`], which reads the profile
//! and KPIs directly:
//!
//! - segment membership: `'gamer' in segments`, `'gamer' in profile.segments`,
//!   `'games' in kpi.overdue_groups`, and `size(segments) >= 2`;
//! - comparisons of a field with a literal: `kpi.frequency >= 3`, `profile.tier == 'gold'`,
//!   `profile.affinities['games'] > 0.5`, `event.zone == 'games'`;
//! - a bool field on its own (`kpi.overdue`), `&&`, `||`, `!` and `true`/`false`.
//!
//! Invariant: the fast path answers only when it is sure to give CEL's answer. Whenever a
//! value is missing, null, not finite or of a type the shape does not expect (where CEL might
//! raise an error, or compare across types), it answers "don't know", and the decision runs
//! the CEL program instead, so that errors and their messages are CEL's. `&&` and `||` follow
//! CEL's commutative error absorption: `false && x` is false and `true || x` true whatever `x`
//! is. A property test checks the two against each other on random profiles and expressions.

use cel::common::ast::{Expr, LiteralValue, operators};

use crate::profiles::Profile;
use crate::profiles::kpi::KpiView;

use super::campaign::Trigger;
use super::decide::Occasion;

/// A compiled audience: the CEL program, and its typed translation when there is one.
#[derive(Debug)]
pub struct Audience {
    pub program: cel::Program,
    fast: Option<Fast>,
    reads_event: bool,
}

impl Audience {
    pub fn compile(source: &str) -> Result<Audience, cel::ParseErrors> {
        let program = cel::Program::compile(source)?;
        let fast = Fast::from_expr(&program.expression().expr);
        let reads_event = program.references().has_variable("event");
        Ok(Audience {
            program,
            fast,
            reads_event,
        })
    }

    /// Whether the expression reads `event` (its triggers among it): a decision it wins
    /// may rest on any trigger of the occasion.
    pub fn reads_event(&self) -> bool {
        self.reads_event
    }

    /// Whether the typed path covers this expression.
    pub fn is_typed(&self) -> bool {
        self.fast.is_some()
    }

    /// CEL's verdict alone, in a context of its own; `None` for an error or a non-boolean.
    /// Decisions share one context across campaigns instead; this is for checking the typed
    /// path against CEL (tests, fuzzing).
    pub fn cel_verdict(
        &self,
        profile: &Profile,
        kpi: Option<&KpiView>,
        o: &Occasion,
    ) -> Option<bool> {
        match self
            .program
            .execute(&super::decide::audience_context(profile, kpi, o))
        {
            Ok(cel::Value::Bool(b)) => Some(b),
            _ => None,
        }
    }

    /// The typed path's verdict; `None` means "run the CEL program".
    pub fn fast(&self, profile: &Profile, kpi: Option<&KpiView>, o: &Occasion) -> Option<bool> {
        let env = Env { profile, kpi, o };
        self.fast.as_ref()?.eval(&env)
    }
}

struct Env<'a> {
    profile: &'a Profile,
    kpi: Option<&'a KpiView>,
    o: &'a Occasion,
}

/// A number as CEL holds it: integers (int and uint, compared exactly across the two) or a
/// double (then both sides compare as doubles, as CEL does).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i128),
    Double(f64),
}

#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Num(Num),
    Str(String),
    Bool(bool),
}

#[derive(Debug, Clone, Copy)]
enum Val<'a> {
    Num(Num),
    Str(&'a str),
    Bool(bool),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A scalar the typed path can read.
#[derive(Debug, Clone, PartialEq)]
enum Field {
    CustomerId,
    FirstName,
    Tier,
    Points,
    Affinity(String),
    Kpi(&'static str),
    Trigger,
    Zone,
    Lane,
}

/// A list of strings the typed path can read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum List {
    /// The `segments` variable: always a list, empty or not.
    Segments,
    /// `profile.segments`: absent from the profile's JSON when empty.
    ProfileSegments,
    OverdueGroups,
}

#[derive(Debug, Clone, PartialEq)]
enum Fast {
    Const(bool),
    Contains(String, List),
    Size(List, Op, Num),
    Cmp(Field, Op, Lit),
    Truthy(Field),
    And(Box<Fast>, Box<Fast>),
    Or(Box<Fast>, Box<Fast>),
    Not(Box<Fast>),
}

const KPI_FIELDS: &[&str] = &[
    "revenue_12m",
    "revenue_prev_12m",
    "revenue_this_year",
    "revenue_last_year",
    "purchases_this_year",
    "frequency",
    "recency_days",
    "age_days",
    "days_since_last",
    "p_alive",
    "expected_purchases_90d",
    "clv",
    "overdue",
    "activity",
];

fn op(name: &str) -> Option<Op> {
    Some(match name {
        operators::EQUALS => Op::Eq,
        operators::NOT_EQUALS => Op::Ne,
        operators::LESS => Op::Lt,
        operators::LESS_EQUALS => Op::Le,
        operators::GREATER => Op::Gt,
        operators::GREATER_EQUALS => Op::Ge,
        _ => return None,
    })
}

impl Op {
    /// The same comparison with its operands swapped: `3 < x` is `x > 3`.
    fn flip(self) -> Op {
        match self {
            Op::Lt => Op::Gt,
            Op::Le => Op::Ge,
            Op::Gt => Op::Lt,
            Op::Ge => Op::Le,
            same => same,
        }
    }

    fn holds(self, o: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Op::Eq => o == Equal,
            Op::Ne => o != Equal,
            Op::Lt => o == Less,
            Op::Le => o != Greater,
            Op::Gt => o == Greater,
            Op::Ge => o != Less,
        }
    }
}

fn literal(e: &Expr) -> Option<Lit> {
    let Expr::Literal(l) = e else { return None };
    Some(match l {
        LiteralValue::Int(i) => Lit::Num(Num::Int(i128::from(*i.inner()))),
        LiteralValue::UInt(u) => Lit::Num(Num::Int(i128::from(*u.inner()))),
        LiteralValue::Double(d) if d.inner().is_finite() => Lit::Num(Num::Double(*d.inner())),
        LiteralValue::String(s) => Lit::Str(s.inner().to_string()),
        LiteralValue::Boolean(b) => Lit::Bool(*b.inner()),
        _ => return None,
    })
}

/// `root.name` (not `has(root.name)`).
fn select(e: &Expr) -> Option<(&str, &str)> {
    let Expr::Select(s) = e else { return None };
    if s.test {
        return None;
    }
    let Expr::Ident(root) = &s.operand.expr else {
        return None;
    };
    Some((root, &s.field))
}

fn field(e: &Expr) -> Option<Field> {
    if let Expr::Call(c) = e
        && c.func_name == operators::INDEX
        && c.target.is_none()
        && let [map, key] = &c.args[..]
        && select(&map.expr) == Some(("profile", "affinities"))
        && let Some(Lit::Str(key)) = literal(&key.expr)
    {
        return Some(Field::Affinity(key));
    }
    Some(match select(e)? {
        ("profile", "customer_id") => Field::CustomerId,
        ("profile", "first_name") => Field::FirstName,
        ("profile", "tier") => Field::Tier,
        ("profile", "points") => Field::Points,
        ("kpi", name) => Field::Kpi(KPI_FIELDS.iter().find(|f| **f == name)?),
        ("event", "trigger") => Field::Trigger,
        ("event", "zone") => Field::Zone,
        ("event", "lane") => Field::Lane,
        _ => return None,
    })
}

fn list(e: &Expr) -> Option<List> {
    if let Expr::Ident(name) = e {
        return (name == "segments").then_some(List::Segments);
    }
    match select(e)? {
        ("profile", "segments") => Some(List::ProfileSegments),
        ("kpi", "overdue_groups") => Some(List::OverdueGroups),
        _ => None,
    }
}

/// `size(list)` or `list.size()`.
fn size(e: &Expr) -> Option<List> {
    let Expr::Call(c) = e else { return None };
    if c.func_name != "size" {
        return None;
    }
    match (&c.target, &c.args[..]) {
        (None, [arg]) => list(&arg.expr),
        (Some(target), []) => list(&target.expr),
        _ => None,
    }
}

impl Fast {
    fn from_expr(e: &Expr) -> Option<Fast> {
        match e {
            Expr::Literal(LiteralValue::Boolean(b)) => Some(Fast::Const(*b.inner())),
            Expr::Call(c) if c.target.is_none() => match (c.func_name.as_str(), &c.args[..]) {
                (operators::LOGICAL_AND, [a, b]) => Some(Fast::And(
                    Box::new(Fast::from_expr(&a.expr)?),
                    Box::new(Fast::from_expr(&b.expr)?),
                )),
                (operators::LOGICAL_OR, [a, b]) => Some(Fast::Or(
                    Box::new(Fast::from_expr(&a.expr)?),
                    Box::new(Fast::from_expr(&b.expr)?),
                )),
                (operators::LOGICAL_NOT, [a]) => {
                    Some(Fast::Not(Box::new(Fast::from_expr(&a.expr)?)))
                }
                (operators::IN, [item, l]) => match literal(&item.expr)? {
                    Lit::Str(s) => Some(Fast::Contains(s, list(&l.expr)?)),
                    _ => None,
                },
                (name, [a, b]) if op(name).is_some() => {
                    let op = op(name)?;
                    let (a, b) = (&a.expr, &b.expr);
                    if let Some(l) = size(a) {
                        let Lit::Num(n) = literal(b)? else {
                            return None;
                        };
                        return Some(Fast::Size(l, op, n));
                    }
                    if let Some(l) = size(b) {
                        let Lit::Num(n) = literal(a)? else {
                            return None;
                        };
                        return Some(Fast::Size(l, op.flip(), n));
                    }
                    match (field(a), field(b)) {
                        (Some(f), None) => Some(Fast::Cmp(f, op, literal(b)?)),
                        (None, Some(f)) => Some(Fast::Cmp(f, op.flip(), literal(a)?)),
                        _ => None,
                    }
                }
                _ => field(e).map(Fast::Truthy),
            },
            _ => field(e).map(Fast::Truthy),
        }
    }

    fn eval(&self, env: &Env) -> Option<bool> {
        match self {
            Fast::Const(b) => Some(*b),
            Fast::Contains(item, l) => Some(env.list(*l)?.iter().any(|s| s == item)),
            Fast::Size(l, op, n) => {
                let len = Num::Int(env.list(*l)?.len() as i128);
                Some(op.holds(compare(len, *n)?))
            }
            Fast::Cmp(f, op, lit) => {
                let v = env.field(f)?;
                let ordering = match (v, lit) {
                    (Val::Num(a), Lit::Num(b)) => compare(a, *b)?,
                    (Val::Str(a), Lit::Str(b)) => a.cmp(b.as_str()),
                    (Val::Bool(a), Lit::Bool(b)) if matches!(op, Op::Eq | Op::Ne) => a.cmp(b),
                    _ => return None,
                };
                Some(op.holds(ordering))
            }
            Fast::Truthy(f) => match env.field(f)? {
                Val::Bool(b) => Some(b),
                _ => None,
            },
            Fast::And(a, b) => match (a.eval(env), b.eval(env)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Fast::Or(a, b) => match (a.eval(env), b.eval(env)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Fast::Not(a) => a.eval(env).map(|b| !b),
        }
    }
}

fn compare(a: Num, b: Num) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
        (Num::Int(a), Num::Double(b)) => (a as f64).partial_cmp(&b),
        (Num::Double(a), Num::Int(b)) => a.partial_cmp(&(b as f64)),
        (Num::Double(a), Num::Double(b)) => a.partial_cmp(&b),
    }
}

fn int(v: impl Into<i128>) -> Option<Val<'static>> {
    Some(Val::Num(Num::Int(v.into())))
}

/// Not finite serialises as JSON null, which CEL cannot compare: leave it to CEL.
fn double(v: f64) -> Option<Val<'static>> {
    v.is_finite().then_some(Val::Num(Num::Double(v)))
}

impl<'a> Env<'a> {
    fn list(&self, l: List) -> Option<&'a [String]> {
        match l {
            List::Segments => Some(&self.profile.segments),
            List::ProfileSegments => {
                Some(&self.profile.segments).filter(|s: &&Vec<String>| !s.is_empty())
            }
            List::OverdueGroups => Some(&self.kpi?.overdue_groups),
        }
        .map(|v| v.as_slice())
    }

    fn field(&self, f: &Field) -> Option<Val<'a>> {
        let p = self.profile;
        match f {
            Field::CustomerId => Some(Val::Str(&p.customer_id)),
            Field::FirstName => p.first_name.as_deref().map(Val::Str),
            Field::Tier => p.tier.as_deref().map(Val::Str),
            Field::Points => int(p.points),
            Field::Affinity(key) => double(*p.affinities.get(key)?),
            Field::Trigger => self.o.triggers.first().map(|t| Val::Str(Trigger::name(t))),
            Field::Zone => self.o.zone.as_deref().map(Val::Str),
            Field::Lane => self.o.lane.as_deref().map(Val::Str),
            Field::Kpi(name) => {
                let k = self.kpi?;
                match *name {
                    "revenue_12m" => int(k.revenue_12m),
                    "revenue_prev_12m" => int(k.revenue_prev_12m),
                    "revenue_this_year" => int(k.revenue_this_year),
                    "revenue_last_year" => int(k.revenue_last_year),
                    "purchases_this_year" => int(k.purchases_this_year),
                    "frequency" => int(k.frequency),
                    "recency_days" => int(k.recency_days?),
                    "age_days" => int(k.age_days?),
                    "days_since_last" => int(k.days_since_last?),
                    "clv" => int(k.clv?),
                    "p_alive" => double(k.p_alive?),
                    "expected_purchases_90d" => double(k.expected_purchases_90d?),
                    "overdue" => Some(Val::Bool(k.overdue)),
                    "activity" => k.activity.map(|a| Val::Str(a.name())),
                    _ => None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::kpi::{KpiConfig, Kpis, LedgerEntry};
    use proptest::prelude::*;

    #[test]
    fn the_common_shapes_are_typed_and_the_rest_are_not() {
        for typed in [
            "'gamer' in segments",
            "'gamer' in profile.segments && profile.tier == 'gold'",
            "kpi.frequency >= 3 && profile.tier == 'gold'",
            "kpi.overdue || profile.points > 2000",
            "size(profile.segments) >= 2 && kpi.revenue_this_year > 50000",
            "segments.size() == 0",
            "3 <= kpi.frequency",
            "!('x' in segments) && profile.affinities['games'] > 0.5",
            "'games' in kpi.overdue_groups",
            "event.zone == 'games' && kpi.activity != 'passive'",
            "true",
        ] {
            assert!(Audience::compile(typed).unwrap().is_typed(), "{typed}");
        }
        for cel_only in [
            "profile.follow_ups.exists(f, f.if_bought.category == 'consoles')",
            "has(profile.tier)",
            "kpi.frequency + 1 > 3",
            "profile.tier == profile.first_name",
            "kpi.rfm.r >= 4",
            "profile.consents.personalised_offers",
            "kpi.frequency == null",
            "'gamer' in profile.affinities",
        ] {
            assert!(
                !Audience::compile(cel_only).unwrap().is_typed(),
                "{cel_only}"
            );
        }
    }

    fn occasion(zone: Option<String>) -> Occasion {
        Occasion {
            triggers: vec![Trigger::StoreEntered],
            store: "s1".into(),
            zone,
            lane: Some("3".into()),
            at: "2026-11-23T10:00:00Z".parse().unwrap(),
            basket: None,
        }
    }

    fn kpi_view(purchases: u32, gap: i64) -> KpiView {
        let day = |d: &str| d.parse::<jiff::civil::Date>().unwrap();
        let ledger: Vec<LedgerEntry> = (0..purchases)
            .map(|i| LedgerEntry {
                day: day("2025-01-01") + jiff::Span::new().days(i64::from(i) * gap),
                amount: 4000 + i64::from(i) * 100,
                anchors: Vec::new(),
                main: None,
                groups: vec![if i % 2 == 0 { "games" } else { "toys" }.into()],
            })
            .collect();
        Kpis::compute(&ledger).view(day("2026-11-23"), &KpiConfig::default(), None, None)
    }

    /// Expressions over the typed shapes, with fields and literals that sometimes match,
    /// sometimes are missing, and sometimes are of the wrong type.
    fn arb_expr() -> impl Strategy<Value = String> {
        let field = prop::sample::select(vec![
            "profile.tier",
            "profile.first_name",
            "profile.points",
            "profile.customer_id",
            "profile.affinities['games']",
            "kpi.frequency",
            "kpi.revenue_this_year",
            "kpi.revenue_12m",
            "kpi.purchases_this_year",
            "kpi.days_since_last",
            "kpi.p_alive",
            "kpi.clv",
            "kpi.overdue",
            "kpi.activity",
            "event.zone",
            "event.trigger",
            "event.lane",
        ]);
        let lit = prop::sample::select(vec![
            "0", "3", "-2", "2000", "5u", "0.5", "2.0", "'gold'", "'games'", "'loyal'", "'c1'",
            "true", "false", "'3'",
        ]);
        let op = prop::sample::select(vec!["==", "!=", "<", "<=", ">", ">="]);
        let list = prop::sample::select(vec!["segments", "profile.segments", "kpi.overdue_groups"]);
        let item = prop::sample::select(vec!["'gamer'", "'family'", "'games'", "'toys'"]);
        let leaf = prop_oneof![
            (field.clone(), op.clone(), lit.clone()).prop_map(|(f, o, l)| format!("{f} {o} {l}")),
            (lit.clone(), op.clone(), field.clone()).prop_map(|(l, o, f)| format!("{l} {o} {f}")),
            (item, list.clone()).prop_map(|(i, l)| format!("{i} in {l}")),
            (list, op, prop::sample::select(vec!["0", "1", "2u", "1.5"]))
                .prop_map(|(l, o, n)| format!("size({l}) {o} {n}")),
            field.prop_map(str::to_string),
            Just("true".to_string()),
        ];
        leaf.prop_recursive(3, 12, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} && {b})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} || {b})")),
                inner.prop_map(|a| format!("!({a})")),
            ]
        })
    }

    fn arb_profile() -> impl Strategy<Value = (Profile, Option<KpiView>, Option<String>)> {
        (
            prop::option::of(prop::sample::select(vec!["gold", "silver", "games"])),
            prop::option::of(Just("Ada")),
            -10i64..5000,
            prop::sample::subsequence(vec!["gamer", "family", "games"], 0..3),
            prop::option::of(prop::sample::select(vec![0.0, 0.5, 0.9, f64::NAN])),
            prop::option::of((0u32..12, 5i64..400)),
            prop::option::of(prop::sample::select(vec!["games", "toys"])),
        )
            .prop_map(|(tier, name, points, segments, affinity, kpi, zone)| {
                let mut p = Profile::new("c1");
                p.tier = tier.map(str::to_string);
                p.first_name = name.map(str::to_string);
                p.points = points;
                p.segments = segments.into_iter().map(str::to_string).collect();
                if let Some(a) = affinity {
                    p.affinities.insert("games".into(), a);
                }
                let kpi = kpi.map(|(n, gap)| kpi_view(n, gap));
                (p, kpi, zone.map(str::to_string))
            })
    }

    fn by_cel(a: &Audience, p: &Profile, k: Option<&KpiView>, o: &Occasion) -> Option<bool> {
        a.cel_verdict(p, k, o)
    }

    proptest! {
        #[test]
        fn the_fast_path_agrees_with_cel_whenever_it_answers(
            expr in arb_expr(),
            (profile, kpi, zone) in arb_profile(),
        ) {
            let a = Audience::compile(&expr).unwrap();
            prop_assert!(a.is_typed(), "{}", expr);
            let o = occasion(zone);
            if let Some(fast) = a.fast(&profile, kpi.as_ref(), &o) {
                prop_assert_eq!(Some(fast), by_cel(&a, &profile, kpi.as_ref(), &o), "{}", expr);
            }
        }
    }

    #[test]
    fn the_fast_path_answers_the_usual_cases_itself() {
        let mut p = Profile::new("c1");
        p.tier = Some("gold".into());
        p.segments = vec!["gamer".into()];
        let k = kpi_view(8, 30);
        let o = occasion(None);
        for (expr, want) in [
            ("'gamer' in segments", true),
            ("'family' in profile.segments", false),
            ("kpi.frequency >= 3 && profile.tier == 'gold'", true),
            ("kpi.overdue || profile.points > 2000", k.overdue),
            ("size(segments) >= 2", false),
        ] {
            let a = Audience::compile(expr).unwrap();
            assert_eq!(a.fast(&p, Some(&k), &o), Some(want), "{expr}");
            assert_eq!(by_cel(&a, &p, Some(&k), &o), Some(want), "{expr}");
        }
        // Without KPIs CEL raises an error (no such key); the fast path leaves it to CEL.
        let a = Audience::compile("kpi.frequency >= 3").unwrap();
        assert_eq!(a.fast(&p, None, &o), None);
        // ... unless the other side of && already decides, as in CEL.
        let a = Audience::compile("kpi.frequency >= 3 && 'family' in segments").unwrap();
        assert_eq!(a.fast(&p, None, &o), Some(false));
        assert_eq!(by_cel(&a, &p, None, &o), Some(false));
    }
}
