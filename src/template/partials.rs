//! What the templates include, read from their compiled form before any
//! row is rendered. Partials that include each other in a loop recurse
//! until the stack overflows (handlebars only catches a partial including
//! itself directly), and partials repeated inside each other grow a
//! message exponentially; both are refused here with the partials' names.

use std::collections::HashMap;

use handlebars::template::{Parameter, Template, TemplateElement};
use handlebars::JsonRender;

/// Where an inclusion leads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Named(String),
    /// `{{> (expression)}}`: chosen while rendering, so possibly any partial.
    Dynamic,
    /// `{{> @partial-block}}`: the block the caller rendered beforehand.
    Block,
}

/// How deep blocks and partials may nest. Rendering recurses once per
/// level with a large stack frame, and a few thousand levels overflow the
/// stack; real templates nest a handful.
pub const MAX_NESTING: usize = 100;

/// One inclusion of a partial, at the block depth where it stands.
#[derive(Debug)]
struct Include {
    target: Target,
    /// The block passed to it: `{{#> layout}}block{{/layout}}`.
    block: Option<Shape>,
    depth: usize,
}

/// A template reduced to what the analysis needs: its literal text, how
/// deep its own blocks nest, and the partials it includes.
#[derive(Debug, Default)]
struct Shape {
    text: u64,
    depth: usize,
    includes: Vec<Include>,
}

impl Shape {
    /// Reads `template`, and every inline partial it defines into `inline`.
    fn of(template: &Template, inline: &mut Vec<(String, Shape)>) -> Shape {
        let mut shape = Shape::default();
        shape.add(template, inline, 0);
        shape
    }

    /// Past [`MAX_NESTING`] it stops descending: the depth found is enough
    /// to refuse the template, and the walk itself stays shallow.
    fn add(&mut self, template: &Template, inline: &mut Vec<(String, Shape)>, depth: usize) {
        self.depth = self.depth.max(depth);
        if depth > MAX_NESTING {
            return;
        }
        for element in &template.elements {
            match element {
                TemplateElement::RawString(text) => {
                    self.text = self.text.saturating_add(text.len() as u64)
                }
                TemplateElement::HelperBlock(helper) => {
                    // Both branches, as if both were rendered: an upper bound.
                    for branch in [&helper.template, &helper.inverse].into_iter().flatten() {
                        self.add(branch, inline, depth + 1);
                    }
                }
                TemplateElement::PartialExpression(partial) => self.includes.push(Include {
                    target: target(&partial.name),
                    block: None,
                    depth,
                }),
                TemplateElement::PartialBlock(partial) => {
                    let block = partial.template.as_ref().map(|t| {
                        let mut block = Shape::default();
                        block.add(t, inline, depth + 1);
                        block
                    });
                    self.includes.push(Include {
                        target: target(&partial.name),
                        block,
                        depth,
                    });
                }
                TemplateElement::DecoratorBlock(decorator) => {
                    let Some(body) = &decorator.template else {
                        continue;
                    };
                    match (&decorator.name, decorator.params.first()) {
                        (Parameter::Name(name), Some(Parameter::Literal(partial)))
                            if name == "inline" =>
                        {
                            let shape = Shape::of(body, inline);
                            inline.push((partial.render(), shape));
                        }
                        _ => self.add(body, inline, depth + 1),
                    }
                }
                _ => {}
            }
        }
    }

    /// How many times the block passed to this template is written.
    fn block_uses(&self) -> u64 {
        self.includes
            .iter()
            .map(|i| {
                u64::from(i.target == Target::Block) + i.block.as_ref().map_or(0, Shape::block_uses)
            })
            .sum()
    }

    /// Every partial this shape may include, blocks included.
    fn targets<'a>(&'a self, out: &mut Vec<&'a Target>) {
        for include in &self.includes {
            out.push(&include.target);
            if let Some(block) = &include.block {
                block.targets(out);
            }
        }
    }
}

fn target(name: &Parameter) -> Target {
    let name = match name {
        Parameter::Name(name) => name.clone(),
        Parameter::Path(handlebars::Path::Relative((_, raw)))
        | Parameter::Path(handlebars::Path::Local((_, _, raw))) => raw.clone(),
        Parameter::Literal(value) => value.render(),
        _ => return Target::Dynamic,
    };
    if name == "@partial-block" {
        Target::Block
    } else {
        Target::Named(name)
    }
}

/// Why the templates cannot be rendered at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartialsError {
    #[error(
        "partials include each other in a loop ({}), which never ends; \
         remove one of these inclusions",
        .0.join(" → ")
    )]
    Loop(Vec<String>),
    #[error(
        "with its partials included it comes to {}, over the {} a message may carry",
        crate::bounded::human_size(*.size),
        crate::bounded::human_size(*.max)
    )]
    TooLarge { size: u64, max: u64 },
    #[error(
        "blocks and partials nest more than {MAX_NESTING} levels deep here, the most that is \
         rendered: flatten them"
    )]
    TooDeep,
}

/// The partials of a campaign, by name, as the renderer will find them.
pub struct Partials {
    shapes: HashMap<String, Vec<Shape>>,
    /// Each partial's literal size with its partials included.
    sizes: HashMap<String, u64>,
    /// How deep each partial nests, its partials included.
    depths: HashMap<String, usize>,
}

impl Partials {
    /// Reads the named partials (and the inline partials defined in them
    /// or in `templates`). Fails on a loop, naming its partials.
    pub fn new<'a>(
        partials: impl IntoIterator<Item = (&'a str, &'a Template)>,
        templates: impl IntoIterator<Item = &'a Template>,
    ) -> Result<Partials, PartialsError> {
        let mut inline = Vec::new();
        let mut shapes: HashMap<String, Vec<Shape>> = HashMap::new();
        for (name, template) in partials {
            let shape = Shape::of(template, &mut inline);
            shapes.entry(name.to_string()).or_default().push(shape);
        }
        for template in templates {
            Shape::of(template, &mut inline);
        }
        for (name, shape) in inline {
            shapes.entry(name).or_default().push(shape);
        }
        let partials = Partials {
            shapes,
            sizes: HashMap::new(),
            depths: HashMap::new(),
        };
        partials.find_loop()?;
        Ok(partials.with_sizes())
    }

    /// The partials that `name` includes directly.
    fn edges(&self, name: &str) -> Vec<String> {
        let mut targets = Vec::new();
        for shape in self.shapes.get(name).into_iter().flatten() {
            shape.targets(&mut targets);
        }
        let mut out: Vec<String> = Vec::new();
        for target in targets {
            match target {
                Target::Named(n) if self.shapes.contains_key(n) => out.push(n.clone()),
                // Handlebars itself refuses a partial that names itself.
                Target::Dynamic => out.extend(self.shapes.keys().filter(|n| *n != name).cloned()),
                _ => {}
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// A depth-first search, without recursion: a folder of thousands of
    /// partials must not overflow the stack either.
    fn find_loop(&self) -> Result<(), PartialsError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Open,
            Done,
        }
        let mut marks: HashMap<&str, Mark> = HashMap::new();
        let mut names: Vec<&String> = self.shapes.keys().collect();
        names.sort();
        for start in names {
            if marks.contains_key(start.as_str()) {
                continue;
            }
            // The current path, each with the edges still to follow.
            let mut path: Vec<(&str, Vec<String>)> = vec![(start, self.edges(start))];
            marks.insert(start, Mark::Open);
            while let Some((name, todo)) = path.last_mut() {
                let name = *name;
                let Some(next) = todo.pop() else {
                    marks.insert(name, Mark::Done);
                    path.pop();
                    continue;
                };
                let (next, _) = self
                    .shapes
                    .get_key_value(&next)
                    .expect("edges name partials");
                match marks.get(next.as_str()) {
                    Some(Mark::Done) => {}
                    Some(Mark::Open) => {
                        let from = path.iter().position(|(n, _)| *n == next).unwrap_or(0);
                        let mut chain: Vec<String> =
                            path[from..].iter().map(|(n, _)| n.to_string()).collect();
                        chain.push(next.clone());
                        return Err(PartialsError::Loop(chain));
                    }
                    None => {
                        marks.insert(next, Mark::Open);
                        path.push((next, self.edges(next)));
                    }
                }
            }
        }
        Ok(())
    }

    /// Each partial's largest literal size and depth, partials included,
    /// computed leaves first (the graph has no loop by now).
    fn with_sizes(mut self) -> Partials {
        let mut order: Vec<String> = Vec::new();
        let mut seen: HashMap<String, bool> = HashMap::new();
        let mut names: Vec<String> = self.shapes.keys().cloned().collect();
        names.sort();
        for start in names {
            let mut stack = vec![(start, false)];
            while let Some((name, expanded)) = stack.pop() {
                if expanded {
                    order.push(name);
                    continue;
                }
                if seen.insert(name.clone(), true).is_some() {
                    continue;
                }
                stack.push((name.clone(), true));
                for next in self.edges(&name) {
                    if !seen.contains_key(&next) {
                        stack.push((next, false));
                    }
                }
            }
        }
        for name in order {
            let size = self.shapes[&name]
                .iter()
                .map(|shape| self.size_of(shape))
                .max()
                .unwrap_or(0);
            let depth = self.shapes[&name]
                .iter()
                .map(|shape| self.depth_of(shape))
                .max()
                .unwrap_or(0);
            self.sizes.insert(name.clone(), size);
            self.depths.insert(name, depth);
        }
        self
    }

    fn depth_of(&self, shape: &Shape) -> usize {
        shape.includes.iter().fold(shape.depth, |deepest, include| {
            let block = include.block.as_ref().map_or(0, |b| self.depth_of(b));
            let partial = match &include.target {
                Target::Block => 0,
                Target::Named(name) => self.depths.get(name).copied().unwrap_or(0),
                Target::Dynamic => self.depths.values().copied().max().unwrap_or(0),
            };
            deepest
                .max(block)
                .max(include.depth.saturating_add(1).saturating_add(partial))
        })
    }

    fn size_of(&self, shape: &Shape) -> u64 {
        shape.includes.iter().fold(shape.text, |total, include| {
            let block_size = include.block.as_ref().map_or(0, |b| self.size_of(b));
            let max_uses = |shapes: &mut dyn Iterator<Item = &Shape>| {
                shapes.map(Shape::block_uses).max().unwrap_or(0)
            };
            // The block is rendered once before the partial, used or not,
            // then written wherever the partial uses it.
            let included = match &include.target {
                Target::Block => 0,
                Target::Named(name) => match self.shapes.get(name) {
                    Some(shapes) => self.sizes.get(name).copied().unwrap_or(0).saturating_add(
                        block_size.saturating_mul(max_uses(&mut shapes.iter()).max(1)),
                    ),
                    // A missing partial renders its block instead, or fails.
                    None => block_size,
                },
                Target::Dynamic => {
                    let largest = self.sizes.values().copied().max().unwrap_or(0);
                    let uses = max_uses(&mut self.shapes.values().flatten());
                    largest.saturating_add(block_size.saturating_mul(uses.max(1)))
                }
            };
            total.saturating_add(included)
        })
    }

    /// Refuses a template that nests too deep, or whose literal text, with
    /// every partial included, is larger than `max`: it would be built
    /// whole before being refused.
    pub fn check(&self, template: &Template, max: u64) -> Result<(), PartialsError> {
        let shape = Shape::of(template, &mut Vec::new());
        let depth = self.depth_of(&shape);
        if depth > MAX_NESTING {
            return Err(PartialsError::TooDeep);
        }
        let size = self.size_of(&shape);
        if size > max {
            return Err(PartialsError::TooLarge { size, max });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(source: &str) -> Template {
        Template::compile(source).unwrap()
    }

    fn partials(list: &[(&str, &str)]) -> Result<Partials, PartialsError> {
        let compiled: Vec<(&str, Template)> = list.iter().map(|(n, s)| (*n, compile(s))).collect();
        Partials::new(compiled.iter().map(|(n, t)| (*n, t)), [])
    }

    #[test]
    fn loops_of_any_length_are_found_and_named() {
        assert_eq!(
            partials(&[("a", "A {{> b}}"), ("b", "B {{> a}}")]).err(),
            Some(PartialsError::Loop(vec![
                "a".into(),
                "b".into(),
                "a".into()
            ]))
        );
        let err = partials(&[
            ("a", "{{> b}}"),
            ("b", "{{#if x}}{{> c}}{{/if}}"),
            ("c", "{{#> a}}x{{/a}}"),
        ])
        .err()
        .unwrap();
        assert_eq!(err.to_string().matches('→').count(), 3, "{err}");
        assert!(partials(&[
            ("a", "{{> b}}{{> b}}"),
            ("b", "{{> @partial-block}}"),
            ("c", "{{> a}}")
        ])
        .is_ok());
    }

    #[test]
    fn a_partial_chosen_while_rendering_may_be_any_other() {
        assert!(partials(&[("a", "{{> (lookup this \"p\")}}"), ("b", "{{> a}}")]).is_err());
        assert!(partials(&[("a", "{{> (lookup this \"p\")}}"), ("b", "plain")]).is_ok());
    }

    #[test]
    fn inline_partials_take_part_in_loops() {
        let err = partials(&[("b", "{{#*inline \"a\"}}{{> b}}{{/inline}}{{> a}}")]).err();
        assert!(matches!(err, Some(PartialsError::Loop(_))), "{err:?}");
    }

    #[test]
    fn depth_counts_blocks_and_partials() {
        let p = partials(&[
            ("leaf", "{{#if a}}{{#if b}}x{{/if}}{{/if}}"),
            ("mid", "{{#each c}}{{> leaf}}{{/each}}"),
        ])
        .unwrap();
        assert_eq!(p.depths["mid"], 4);
        let deep = format!(
            "{}{}",
            "{{#if a}}".repeat(MAX_NESTING),
            "{{/if}}".repeat(MAX_NESTING)
        );
        assert!(p.check(&compile(&deep), u64::MAX).is_ok());
        let deeper = format!("{{{{#if a}}}}{deep}{{{{> mid}}}}{{{{/if}}}}");
        assert_eq!(
            p.check(&compile(&deeper), u64::MAX),
            Err(PartialsError::TooDeep)
        );
        let chain: Vec<(String, String)> = (0..=MAX_NESTING)
            .map(|i| (format!("p{i}"), format!("{{{{> p{}}}}}", i + 1)))
            .collect();
        let chain: Vec<(&str, &str)> = chain
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_str()))
            .collect();
        let p = partials(&chain).unwrap();
        assert!(p.check(&compile("{{> p0}}"), u64::MAX).is_err());
    }

    #[test]
    fn sizes_grow_with_partials_and_blocks() {
        let p = partials(&[
            ("p0", &"x".repeat(1000)),
            ("p1", &"{{> p0}}".repeat(10)),
            ("layout", "<{{> @partial-block}}{{> @partial-block}}>"),
        ])
        .unwrap();
        assert!(p.check(&compile("{{> p1}}"), 10_000).is_ok());
        assert_eq!(
            p.check(&compile("{{> p1}}{{> p0}}"), 10_000),
            Err(PartialsError::TooLarge {
                size: 11_000,
                max: 10_000
            })
        );
        assert_eq!(
            p.check(&compile("{{#> layout}}{{> p1}}{{/layout}}"), 10_000),
            Err(PartialsError::TooLarge {
                size: 20_002,
                max: 10_000
            })
        );
    }
}
