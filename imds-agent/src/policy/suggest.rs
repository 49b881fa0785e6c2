//! "Did you mean" for a near miss of a field, value, method or group in a policy.

/// `; did you mean "X"?` for the known word closest to `given`, if one is close (a few edits,
/// or a difference of case).
pub fn did_you_mean(given: &str, known: &[&str]) -> String {
    // Edits, a swapped neighbour pair counting as one (optimal string alignment).
    let distance = |a: &str, b: &str| {
        let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
        let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for (i, row) in d.iter_mut().enumerate() {
            row[0] = i;
        }
        for (j, cell) in d[0].iter_mut().enumerate() {
            *cell = j;
        }
        for i in 1..=a.len() {
            for j in 1..=b.len() {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                d[i][j] = (d[i - 1][j] + 1)
                    .min(d[i][j - 1] + 1)
                    .min(d[i - 1][j - 1] + cost);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
                }
            }
        }
        d[a.len()][b.len()]
    };
    // One edit for short words, a third of the word for long ones.
    let limit = (given.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (distance(&given.to_lowercase(), &k.to_lowercase()), *k))
        .filter(|(d, k)| *d <= limit && *k != given)
        .min()
        .map_or(String::new(), |(_, k)| format!("; did you mean {k:?}?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_words_are_suggested_and_far_ones_are_not() {
        let methods = ["GET", "HEAD", "PUT", "PATCH"];
        assert_eq!(did_you_mean("GTE", &methods), "; did you mean \"GET\"?");
        assert_eq!(did_you_mean("get", &methods), "; did you mean \"GET\"?");
        assert_eq!(did_you_mean("FETCH", &methods), "");
        assert_eq!(
            did_you_mean("GET", &methods),
            "",
            "a known word is no near miss"
        );
        assert_eq!(
            did_you_mean("credential", &["credentials", "token"]),
            "; did you mean \"credentials\"?"
        );
    }
}
