use thiserror::Error;

/// Why a kernel call failed.
#[derive(Debug, Error)]
pub enum KernelError {
    /// A buffer's length does not match the dimensions passed with it.
    #[error("{op}: {what} has {got} elements, expected {expected}")]
    Shape {
        op: &'static str,
        what: &'static str,
        got: usize,
        expected: usize,
    },
    /// A matrix placed inside a tensor ([`crate::MatAt`]) does not fit it: its rows overlap
    /// (`ld` below the row length) or it reaches past the tensor's end.
    #[error("{op}: {what} [{rows}×{cols}] at element {offset} with rows {ld} apart does not fit its tensor of {len} elements")]
    Layout {
        op: &'static str,
        what: &'static str,
        rows: usize,
        cols: usize,
        offset: usize,
        ld: usize,
        len: usize,
    },
    /// Rows stored `ld` elements apart would overlap: `ld` is below the `cols` each row holds.
    #[error("{op}: {what}'s rows are {ld} elements apart, fewer than the {cols} each holds")]
    RowStride {
        op: &'static str,
        what: &'static str,
        cols: usize,
        ld: usize,
    },
    /// The device refused an allocation, a launch or a copy.
    #[error("device error in {op}: {message}")]
    Device { op: &'static str, message: String },
    /// A kernel failed to compile; `log` is the compiler's output.
    #[error("kernel {name} failed to compile:\n{log}")]
    Compile { name: String, log: String },
    /// The backend cannot do what was asked (a dtype it lacks, say).
    #[error("{0}")]
    Unsupported(String),
}

/// Checks that a buffer has the length its dimensions imply.
pub(crate) fn check_len(
    op: &'static str,
    what: &'static str,
    got: usize,
    expected: usize,
) -> crate::Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(KernelError::Shape {
            op,
            what,
            got,
            expected,
        })
    }
}

/// Checks that the block `src[offset..offset + n]` lies inside `src` (`src_len` elements): the
/// block of a stacked result that `axpy_from` adds into a tensor of `n`.
pub(crate) fn check_block_in_src(
    op: &'static str,
    src_len: usize,
    offset: usize,
    n: usize,
) -> crate::Result<()> {
    if offset + n <= src_len {
        Ok(())
    } else {
        Err(KernelError::Shape {
            op,
            what: "src",
            got: src_len,
            expected: offset + n,
        })
    }
}

/// Checks that rows of `cols` elements stored `ld` apart do not overlap (`ld ≥ cols`).
pub(crate) fn check_row_stride(
    op: &'static str,
    what: &'static str,
    cols: usize,
    ld: usize,
) -> crate::Result<()> {
    if ld >= cols {
        Ok(())
    } else {
        Err(KernelError::RowStride { op, what, cols, ld })
    }
}

/// Checks a buffer of `len` elements holding exactly `rows` rows `ld ≥ cols` apart.
pub(crate) fn check_strided_rows(
    op: &'static str,
    what: &'static str,
    (rows, cols, ld): (usize, usize, usize),
    len: usize,
) -> crate::Result<()> {
    check_row_stride(op, what, cols, ld)?;
    check_len(op, what, len, rows * ld)
}

/// Checks that a `[rows, row_len]` buffer of `len` elements holds whole rows (`row_len > 0`).
pub(crate) fn check_rows(op: &'static str, len: usize, row_len: usize) -> crate::Result<()> {
    if len.checked_rem(row_len) == Some(0) {
        Ok(())
    } else {
        Err(KernelError::Shape {
            op,
            what: "out (whole rows of the broadcast row)",
            got: len,
            expected: len.next_multiple_of(row_len.max(1)),
        })
    }
}
