"""Seed sequences for Hadamard matrices of order 156 (= 4*39) and 172 (= 4*43).

Each entry gives the first rows of four circulant +-1 matrices A, B, C, D of odd
order n whose periodic autocorrelations sum to zero at every non-zero shift,
i.e. A A^T + B B^T + C C^T + D D^T = 4n I.  Plugging them into the
Goethals-Seidel array (``vllm_quarot.hadamard``) gives a Hadamard matrix
of order 4n.

All four rows are symmetric (a[i] == a[n - i]), so these are genuine Williamson
sequences: the classical Williamson array works with them too.

Sources (the mathematical data, as tabulated in SageMath's
``sage.combinat.matrices.hadamard_matrix.williamson_type_quadruples_smallcases``):

* n = 43: Baumert & Hall; M. Hall Jr., *Combinatorial Theory*, 2nd ed.,
  Wiley, 1983.
* n = 39: S. London, *Constructing New Turyn Type Sequences, T-Sequences and
  Hadamard Matrices*, PhD thesis, University of Illinois at Chicago, 2013.
"""

GOETHALS_SEIDEL_SEQUENCES: dict[int, tuple[str, str, str, str]] = {
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}
