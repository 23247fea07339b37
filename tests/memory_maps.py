"""What /proc/self/smaps says about a tensor's pages, for the tests' fresh child processes (imported by their
`python -c` scripts, which run from the repository's root)."""


def advised_huge(t) -> bool:
    """Whether the 2 MiB-aligned middle of `t` lies in a mapping advised onto huge pages (smaps' `hg` flag)."""
    address = (t.data_ptr() + (1 << 21) - 1) & ~((1 << 21) - 1)
    assert address + (1 << 21) <= t.data_ptr() + t.nbytes, "the tensor holds no whole 2 MiB page"
    inside = False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and all(c in "0123456789abcdef-" for c in first):
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()
    raise AssertionError("no mapping holds the tensor")
