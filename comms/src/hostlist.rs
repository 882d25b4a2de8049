//! Slurm's compressed lists, expanded: host lists (`SLURM_JOB_NODELIST=node[01-03,07],gpu-a[1-2]`)
//! and tasks-per-node counts (`SLURM_TASKS_PER_NODE=2(x3),1`).
//!
//! A host list is comma-separated items; each item is literal text with bracket groups of
//! comma-separated numbers or ranges `a-b`. A range keeps the zero padding of its lower bound
//! (`[08-10]` → `08 09 10`). Several groups in one item give every combination
//! (`r[1-2]n[1-2]` → `r1n1 r1n2 r2n1 r2n2`).

use crate::{Error, Result};

/// The most hosts a list may expand to; more is surely a typo like `node[0-99999999]`.
const MAX_HOSTS: usize = 1 << 16;

/// Expands a Slurm host list into host names, in order.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>> {
    let fail = |why: &str| Error::BadHostList {
        list: list.to_string(),
        why: why.to_string(),
    };
    let mut hosts = Vec::new();
    for item in split_outside_brackets(list).map_err(|why| fail(&why))? {
        if item.is_empty() {
            return Err(fail("empty host name between commas"));
        }
        hosts.extend(expand_item(item).map_err(|why| fail(&why))?);
        if hosts.len() > MAX_HOSTS {
            return Err(fail(&format!("expands to more than {MAX_HOSTS} hosts")));
        }
    }
    if hosts.is_empty() {
        return Err(fail("the list is empty"));
    }
    Ok(hosts)
}

/// Expands Slurm's tasks-per-node syntax: `2(x3),1` → `[2, 2, 2, 1]`, one count per node.
pub fn expand_tasks_per_node(spec: &str) -> Result<Vec<usize>> {
    let fail = |why: String| Error::BadEnv {
        name: "SLURM_TASKS_PER_NODE".to_string(),
        value: spec.to_string(),
        why,
    };
    let mut counts = Vec::new();
    for part in spec.split(',') {
        let (count, repeat) = match part.split_once("(x") {
            Some((count, rest)) => {
                let repeat = rest
                    .strip_suffix(')')
                    .ok_or_else(|| fail(format!("{part:?} lacks its closing ')'")))?;
                (count, parse_number(repeat).map_err(fail)?)
            }
            None => (part, 1),
        };
        let count = parse_number(count).map_err(fail)?;
        if counts.len() + repeat > MAX_HOSTS {
            return Err(fail(format!("more than {MAX_HOSTS} nodes")));
        }
        counts.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(counts)
}

/// Splits on commas that are not inside `[...]`.
fn split_outside_brackets(list: &str) -> std::result::Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err("nested '['".to_string()),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(format!("']' at byte {i} without its '['")),
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'[' without its ']'".to_string());
    }
    items.push(&list[start..]);
    Ok(items)
}

/// Expands one item (no top-level commas): its first bracket group times the rest, recursively.
fn expand_item(item: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = item.find('[') else {
        return Ok(vec![item.to_string()]);
    };
    let close = open + item[open..].find(']').ok_or("'[' without its ']'")?;
    let (prefix, ranges, rest) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    let suffixes = expand_item(rest)?;
    let mut hosts = Vec::new();
    for number in expand_ranges(ranges)? {
        for suffix in &suffixes {
            hosts.push(format!("{prefix}{number}{suffix}"));
            if hosts.len() > MAX_HOSTS {
                return Err(format!("expands to more than {MAX_HOSTS} hosts"));
            }
        }
    }
    Ok(hosts)
}

/// `01-03,07` → `["01", "02", "03", "07"]`, padded to the width of each range's lower bound.
fn expand_ranges(ranges: &str) -> std::result::Result<Vec<String>, String> {
    let mut numbers = Vec::new();
    for range in ranges.split(',') {
        let (low, high) = range.split_once('-').unwrap_or((range, range));
        let (first, last) = (parse_number(low)?, parse_number(high)?);
        if first > last {
            return Err(format!("range {range:?} runs backwards"));
        }
        if last - first >= MAX_HOSTS {
            return Err(format!("range {range:?} has more than {MAX_HOSTS} hosts"));
        }
        let width = low.len();
        numbers.extend((first..=last).map(|n| format!("{n:0width$}")));
    }
    Ok(numbers)
}

fn parse_number(text: &str) -> std::result::Result<usize, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a number"));
    }
    text.parse()
        .map_err(|_| format!("{text:?} is too large a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_ranges_lists_and_several_items() {
        assert_eq!(
            expand_hostlist("node[01-03,07],gpu-a[1-2]").unwrap(),
            ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]
        );
    }

    #[test]
    fn plain_names_pass_through() {
        assert_eq!(expand_hostlist("login1").unwrap(), ["login1"]);
        assert_eq!(
            expand_hostlist("a,b.example.org").unwrap(),
            ["a", "b.example.org"]
        );
    }

    #[test]
    fn padding_follows_the_lower_bound_across_a_decade() {
        assert_eq!(
            expand_hostlist("n[08-11]").unwrap(),
            ["n08", "n09", "n10", "n11"]
        );
        assert_eq!(expand_hostlist("n[9-10]").unwrap(), ["n9", "n10"]);
    }

    #[test]
    fn several_groups_in_one_item_give_every_combination_and_keep_suffixes() {
        assert_eq!(
            expand_hostlist("r[1-2]n[1,3]-ib").unwrap(),
            ["r1n1-ib", "r1n3-ib", "r2n1-ib", "r2n3-ib"]
        );
    }

    #[test]
    fn malformed_lists_are_refused_with_the_reason() {
        for (list, why) in [
            ("node[01-03", "without its ']'"),
            ("node]1", "without its '['"),
            ("node[3-1]", "runs backwards"),
            ("node[a-b]", "is not a number"),
            ("a,,b", "empty host name"),
            ("", "empty host name"),
            ("n[[1]]", "nested"),
            ("n[0-99999999]", "more than 65536 hosts"),
        ] {
            let err = expand_hostlist(list).unwrap_err().to_string();
            assert!(err.contains(why), "{list:?}: {err}");
            assert!(err.contains(&format!("{list:?}")), "{err}");
        }
    }

    #[test]
    fn tasks_per_node_expands_repeats() {
        assert_eq!(expand_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        assert_eq!(expand_tasks_per_node("4").unwrap(), [4]);
        let err = expand_tasks_per_node("2(x3").unwrap_err().to_string();
        assert!(err.contains("closing ')'"), "{err}");
    }
}
