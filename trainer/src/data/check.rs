//! Checks of tokenized data before the first step: every token id inside the model's vocabulary
//! (an id past the embedding table would fail steps later without saying where it came from),
//! and, for training data, at least one token with a label (else every step's loss is 0 and the
//! run trains nothing while looking fine).

use super::source::ExampleSource;
use anyhow::{bail, Result};
use kernels::IGNORE_INDEX;

/// Refuses `data` (named `what`, e.g. `data.train`) when a token id is outside `0..vocab`,
/// naming the example through `origin(i)`; with `need_targets`, also when no token has a label.
pub fn check_examples(
    data: &dyn ExampleSource,
    vocab: usize,
    what: &str,
    need_targets: bool,
    origin: &dyn Fn(usize) -> String,
) -> Result<()> {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let mut targets = 0usize;
    for i in 0..data.count() {
        ids.clear();
        labels.clear();
        data.append(i, &mut ids, &mut labels);
        if let Some(&id) = ids.iter().find(|&&id| id < 0 || id as usize >= vocab) {
            bail!(
                "{what}: {} holds token id {id}, outside the model's vocabulary (vocab_size {vocab}): \
                 was it tokenized for another model? Prepare the data again with this model's tokenizer",
                origin(i)
            );
        }
        targets += labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    }
    if need_targets && targets == 0 {
        bail!(
            "{what} holds no token to train on ({} examples, every label is -100): check data.train_on_prompt \
             and the chat template's assistant turns, or prepare the data again",
            data.count()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batching::Example;

    fn ex(ids: &[i32], labels: &[i32]) -> Example {
        Example {
            ids: ids.to_vec(),
            labels: labels.to_vec(),
        }
    }

    #[test]
    fn ids_outside_the_vocabulary_and_data_without_labels_are_refused() {
        let origin = |i: usize| format!("example {i}");
        let good = vec![ex(&[1, 2], &[-100, 2])];
        check_examples(&good, 3, "data.train", true, &origin).unwrap();
        let far = vec![ex(&[1, 2], &[1, 2]), ex(&[1, 7], &[1, 7])];
        let e = check_examples(&far, 3, "data.train", true, &origin)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("example 1 holds token id 7") && e.contains("vocab_size 3"),
            "{e}"
        );
        let unlabelled = vec![ex(&[1, 2], &[-100, -100])];
        check_examples(&unlabelled, 3, "data.validation", false, &origin).unwrap();
        let e = check_examples(&unlabelled, 3, "data.train", true, &origin)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no token to train on") && e.contains("-100"),
            "{e}"
        );
    }
}
