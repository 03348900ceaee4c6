"""How many clusters, without labels: the number whose partition the nearest neighbours support best; and
how the clusters nest.

The partitions come from one hierarchy: the kNN graph is over-clustered spectrally into the largest
candidate number (k-means on the row-normalised leading eigenvectors of the graph), and the pieces are joined
two at a time, the pair the neighbours link most beyond chance first (merge_tree), down to the smallest
candidate. Pieces of one kind link strongly and join first whatever their sizes, so a small kind keeps a
cluster of its own while a large one is rejoined; k-means at each C instead cuts kinds to similar sizes (on a
10:1 long tail it split the large kinds and merged the small ones).

Each C is scored by the neighbour modularity at a resolution below one (Reichardt & Bornholdt): the share of
neighbour pairs that fall in one cluster, less RESOLUTION times the share a random partition with the same
cluster sizes keeps together. At resolution one the choice cut kinds into pieces (digits 0, 4 and 7 into 5
clusters): a kNN graph is local, so the pieces of a large kind link little beyond what their sizes predict.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import ArpackError, eigsh
from sklearn.cluster import KMeans

from scan.algo.neighbors import l2_normalize, mine_neighbors, neighbor_agreement
from scan.core.errors import ConfigError
from scan.core.registry import Registry

# the range C is chosen from when the user gives none: 2 .. min(MAX_CLUSTERS, N / MIN_CLUSTER_SIZE)
MAX_CLUSTERS = 50
MIN_CLUSTER_SIZE = 20
# score(C) = neighbour agreement - RESOLUTION x chance agreement; measured on 15 feature sets (9 from scratch,
# 6 pretrained, seeds 0-2; docs/benchmarks.md): 0.8-0.85 choose within tolerance on 33 of 45, 0.7 on 30,
# 1.0 on 31 (it over-splits small-C sets: digits 0, 4, 7 into 5), 0.6 on 27 (it merges Fashion-MNIST kinds)
RESOLUTION = 0.8
PARTITION_FIT_ROWS = 3000
# connected_pieces' cap: parts per spectral cluster
MAX_PIECES_PER_CLUSTER = 4
# close_behind: a number of clusters within this share of the best score is named as worth a look
CLOSE_SHARE = 0.01
# the per-candidate values a choice records (choose/done.json, metrics.json, the report's chart)
CHOICE_CURVES = ("curve", "agreement", "chance")
# the spectral embedding falls back to a dense eigen-solver up to this many images (a 4000 x 4000 matrix: 128 MB)
DENSE_EIGEN_LIMIT = 4000


def neighbor_chance(assignments: np.ndarray, neighbors: np.ndarray) -> float:
    """The share of neighbour pairs a partition with these cluster sizes keeps together by chance:
    Σ_c p_c q_c, with p_c = |{i : a_i = c}| / N the share of images (edge sources) in cluster c and
    q_c = |{(i, k) : a_{n_ik} = c}| / NK the share of neighbour slots (edge targets) pointing into it.
    assignments (N,) ints, neighbors (N, K) indices."""
    a = np.asarray(assignments)
    nb = np.asarray(neighbors)
    c = int(a.max()) + 1
    p = np.bincount(a, minlength=c) / len(a)
    q = np.bincount(a[nb].ravel(), minlength=c) / nb.size
    return float(p @ q)


def neighbor_modularity(assignments: np.ndarray, neighbors: np.ndarray, resolution: float = 1.0) -> float:
    """Modularity of a partition on the directed kNN graph, at a resolution.

    Q = (1 / NK) Σ_i Σ_k [a_i = a_{n_ik}]  −  γ Σ_c p_c q_c  (the share of neighbour pairs inside one cluster,
    less γ times neighbor_chance), γ the resolution. assignments (N,) ints, neighbors (N, K) indices.
    At γ = 1, Q in [-1, 1): 0 for a partition that ignores the graph, 1 - 1/C for C equal, fully separated
    clusters; a lower γ charges large clusters less.
    """
    return neighbor_agreement(assignments, neighbors) - resolution * neighbor_chance(assignments, neighbors)


def knn_graph(neighbors: np.ndarray) -> sp.csr_matrix:
    """(N, N) symmetric 0/1 adjacency: i ~ j when either is among the other's neighbours."""
    n, k = neighbors.shape
    a = sp.csr_matrix((np.ones(n * k, np.float32), (np.repeat(np.arange(n), k), neighbors.ravel())), shape=(n, n))
    return a.maximum(a.T).tocsr()


def spectral_embedding(neighbors: np.ndarray, dims: int) -> np.ndarray:
    """(N, dims) leading eigenvectors of the normalised kNN adjacency D^-1/2 A D^-1/2, largest eigenvalue first.

    The start vector is fixed, so the result does not depend on a random state."""
    a = knn_graph(neighbors)
    scale = sp.diags(1.0 / np.sqrt(np.asarray(a.sum(1)).ravel()))
    n = a.shape[0]
    k = min(dims, n - 1)
    matrix = scale @ a @ scale
    try:
        values, vectors = eigsh(matrix, k=k, which="LA", tol=1e-4, v0=np.full(n, 1 / np.sqrt(n)))
    except ArpackError:
        # kinds so well apart that the graph falls into separate parts give the eigenvalue 1 once per part, a
        # multiplicity on which ARPACK's restarts can stall ("no shifts could be applied"): solve it densely
        # where that is cheap, else with a wider Krylov space
        if n <= DENSE_EIGEN_LIMIT:
            values, vectors = eigh(matrix.toarray(), subset_by_index=[n - k, n - 1])
        else:
            values, vectors = eigsh(matrix, k=k, which="LA", tol=1e-4, v0=np.full(n, 1 / np.sqrt(n)),
                                    ncv=min(n, 4 * k + 1))
    return vectors[:, np.argsort(-values)].astype(np.float32)


def spectral_partition(embedding: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """(N,) clusters of the first `num_clusters` spectral coordinates, rows L2-normalised (Ng, Jordan & Weiss):
    k-means (k-means++, 3 starts) fitted on at most PARTITION_FIT_ROWS of them (seconds for 10k images)."""
    rows = l2_normalize(embedding[:, :num_clusters])
    fit = rows
    if len(rows) > PARTITION_FIT_ROWS:
        fit = rows[np.random.default_rng(seed).choice(len(rows), PARTITION_FIT_ROWS, replace=False)]
    return KMeans(num_clusters, n_init=3, random_state=seed).fit(fit).predict(rows)


def connected_pieces(assignments: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    """(N,) the clusters of `assignments` cut into their connected parts on the kNN graph, numbered 0..P−1;
    `assignments` itself where that would give more than MAX_PIECES_PER_CLUSTER parts per cluster.

    The spectral coordinates of a graph in separate parts (kinds so distinct that no neighbour pair joins them)
    are an arbitrary basis of the parts' indicators, and k-means on them can put two parts in one cluster;
    no merge can undo that, while parts cut apart here are joined again by the merges where they link. The cap
    keeps the merges (O(P³)) within seconds where the graph falls into thousands of parts (bursts of identical
    photos, each its own part)."""
    a = np.asarray(assignments)
    graph = knn_graph(neighbors).tocoo()
    inside = a[graph.row] == a[graph.col]
    within = sp.csr_matrix((graph.data[inside], (graph.row[inside], graph.col[inside])), shape=graph.shape)
    count, parts = connected_components(within, directed=False)
    return parts if count <= MAX_PIECES_PER_CLUSTER * (int(a.max()) + 1) else a


def default_range(num_images: int, low: int = 2, high: int | None = None) -> range:
    """The candidate numbers of clusters: low .. high, high by default min(MAX_CLUSTERS, N / MIN_CLUSTER_SIZE)."""
    top = high if high is not None else min(MAX_CLUSTERS, num_images // MIN_CLUSTER_SIZE)
    return range(low, max(low, top) + 1)


def choice_neighbors(num_images: int, max_clusters: int, requested: int) -> int:
    """The K of the choice's kNN graph: the requested K, at most N / max_clusters, the size of the smallest
    clusters the range allows (at least 2). A kind of 10 images among 20 neighbours each is linked to its
    neighbours' kinds and merged with them. The default range (at most N / MIN_CLUSTER_SIZE clusters) allows
    no cluster under MIN_CLUSTER_SIZE images, so the default K (20) stands; a range raised past it for a small
    folder (80 photos, up to 12 kinds) gets a graph as local as its smallest kinds."""
    return max(2, min(requested, num_images // max_clusters))   # max_clusters < N: candidate_range checks it


def candidate_range(num_images: int, low: int = 2, high: int | None = None) -> range:
    """default_range, checked: a ConfigError in the user's terms when the images are too few to choose from
    or the bounds (choose.min_clusters, choose.max_clusters) do not fit them."""
    if num_images <= max(low, 3):   # a spectral partition needs more rows than clusters
        raise ConfigError(f"{num_images} images are too few to choose the number of clusters (data.num_clusters=auto, "
                          f"the default without labels): pass --num-clusters C")
    if high is not None and high < low:
        raise ConfigError(f"choose.max_clusters={high} is below choose.min_clusters={low}")
    candidates = default_range(num_images, low, high)
    if candidates[-1] >= num_images:
        raise ConfigError(f"choose.max_clusters={candidates[-1]} must be smaller than the number of images "
                          f"({num_images})")
    return candidates


def choose_num_clusters(features: np.ndarray, candidates, num_neighbors: int = 20, seed: int = 0) -> dict:
    """The number of clusters in `candidates` whose partition the nearest neighbours support best.

    The kNN graph (features (N, D), cosine, `num_neighbors` each) is over-clustered spectrally into the largest
    candidate, each cluster cut into its connected parts (connected_pieces), and merged down (merge_partitions);
    each C scores
    score(C) = agreement(C) − RESOLUTION × chance(C), the neighbour modularity at that resolution, with
    agreement the share of neighbour pairs inside one cluster and chance = Σ_c p_c q_c the share a partition
    with the same sizes keeps by chance. The highest score wins; a tie goes to the smaller C.
    Returns {"num_clusters", "curve": {C: score}, "agreement": {C: ...}, "chance": {C: ...}, "criterion",
    "assignments": (N,) the chosen partition}.
    """
    candidates = sorted(set(int(c) for c in candidates))
    neighbors = mine_neighbors(features, num_neighbors)
    partitions = nested_partitions(neighbors, candidates, seed)
    agreement = {c: neighbor_agreement(partitions[c], neighbors) for c in candidates}
    chance = {c: neighbor_chance(partitions[c], neighbors) for c in candidates}
    curve = {c: agreement[c] - RESOLUTION * chance[c] for c in candidates}
    best = max(candidates, key=lambda c: (curve[c], -c))
    return {"num_clusters": best, "curve": curve, "agreement": agreement, "chance": chance,
            "criterion": f"neighbor_modularity(resolution={RESOLUTION}) of merged spectral pieces",
            "assignments": partitions[best]}


def close_behind(curve: dict[int, float], best: int, share: float = CLOSE_SHARE, most: int = 2) -> list[int]:
    """The other numbers of clusters whose score is within `share` (relative) of the best's, highest first, at
    most `most`: the ones worth a look with `scan recluster` (digits scores 10 and 11 clusters 0.8637 and 0.8638)."""
    floor = curve[best] - share * abs(curve[best])
    ranked = sorted((c for c in curve if c != best and curve[c] >= floor), key=lambda c: (-curve[c], c))
    return ranked[:most]


def cluster_links(assignments: np.ndarray, neighbors: np.ndarray, num_clusters: int) -> np.ndarray:
    """(C, C) counts of neighbour slots: entry (a, b) the pairs (i, k) with image i in cluster a and its k-th
    neighbour in cluster b. assignments (N,) ints < C, neighbors (N, K) indices."""
    a = np.asarray(assignments)
    pairs = np.repeat(a, neighbors.shape[1]) * num_clusters + a[np.asarray(neighbors)].ravel()
    return np.bincount(pairs, minlength=num_clusters * num_clusters).reshape(num_clusters, num_clusters)


def merge_tree(assignments: np.ndarray, neighbors: np.ndarray, num_clusters: int | None = None) -> list[dict]:
    """The order in which clusters join as their number shrinks: greedy agglomeration on the kNN graph.

    Each step merges the two groups that the neighbours link most beyond chance, as a ratio:
    link(a, b) = (E_ab + E_ba) / (p_a q_b + p_b q_a), E_ab the share of neighbour slots of a pointing into b,
    p the groups' shares of images and q of neighbour slots (the denominator is what a partition with these
    sizes links by chance). A ratio, not the modularity gain E − chance: the gain is least negative for a
    small group, so a small kind that no neighbour links to anything was merged before the pieces of a large
    kind (kinds of 500, 150 and 50 points ended with the 50 inside another kind). An empty cluster joins
    first. Returns C − 1 steps {"merge": [group, group], "into": new group id, "link": ratio}; the
    final clusters are groups 0..C−1 and step s creates group C + s (a SciPy-linkage-like numbering).
    O(C³) in all.
    """
    a = np.asarray(assignments)
    c = num_clusters or int(a.max()) + 1
    links = cluster_links(a, neighbors, c) / neighbors.size
    p = np.bincount(a, minlength=c) / len(a)
    q = links.sum(0)
    group = list(range(c))            # the group id each row of the matrices holds now
    active = np.ones(c, bool)
    steps = []
    for step in range(c - 1):
        chance = np.outer(p, q) + np.outer(q, p)
        # no chance share: an empty cluster (nothing to keep apart, joins first), or two that no neighbour
        # points into (nothing links them either)
        empty = (p == 0)[:, None] | (p == 0)[None, :]
        link = np.divide(links + links.T, chance, out=np.where(empty, np.inf, 0.0), where=chance > 0)
        link[~active] = -np.inf
        link[:, ~active] = -np.inf
        link[np.tril_indices(c)] = -np.inf   # each pair once, i < j; ties go to the first pair
        i, j = np.unravel_index(int(np.argmax(link)), link.shape)
        steps.append({"merge": sorted([group[i], group[j]]), "into": c + step, "link": float(link[i, j])})
        links[i] += links[j]
        links[:, i] += links[:, j]
        p[i] += p[j]
        q[i] += q[j]
        active[j] = False
        group[i] = c + step
    return steps


def nested_partitions(neighbors: np.ndarray, sizes, seed: int = 0, top: int | None = None) -> dict[int, np.ndarray]:
    """{C: (N,) partition} for each C in `sizes`, all from one hierarchy of the kNN graph: its spectral partition
    into `top` (default the largest C) cut into connected parts (connected_pieces), then merged (merge_partitions)."""
    top = top or max(sizes)
    pieces = connected_pieces(spectral_partition(spectral_embedding(neighbors, top), top, seed), neighbors)
    return merge_partitions(pieces, neighbors, sizes)


def merge_partitions(assignments: np.ndarray, neighbors: np.ndarray, sizes) -> dict[int, np.ndarray]:
    """{C: (N,) the partition into C clusters} for each C in `sizes` (at most the clusters of `assignments`),
    joining clusters in merge_tree's order; clusters renumbered 0..C−1 in the order of their smallest group id."""
    a = np.asarray(assignments)
    top = int(a.max()) + 1
    group = a.copy()
    out = {top: a.copy()} if top in sizes else {}
    for step in merge_tree(a, neighbors, top):
        group[np.isin(group, step["merge"])] = step["into"]
        count = top - (step["into"] - top) - 1
        if count in sizes:
            out[count] = np.unique(group, return_inverse=True)[1]
    return out


def given_size_prior(neighbors: np.ndarray, num_clusters: int, seed: int = 0, shares=()) -> np.ndarray:
    """(C,) the cluster shares the user knows (cluster.prior_shares, any positive scale), normalised to sum 1."""
    if len(shares) != num_clusters or min(shares, default=0) <= 0:
        raise ConfigError(f"cluster.size_prior=given needs cluster.prior_shares: {num_clusters} positive numbers, one "
                          f"per cluster (any scale, e.g. class counts), got {list(shares)}")
    values = np.asarray(shares, dtype=np.float64)
    return (values / values.sum()).astype(np.float32)


def graph_partition(neighbors: np.ndarray, num_clusters: int, seed: int = 0) -> np.ndarray:
    """(N,) the kNN graph's own partition into C: the hierarchy the choice of C uses (nested_partitions, pieces
    for the top of the default range, or C where that is larger) cut at C."""
    top = max(num_clusters, default_range(len(neighbors))[-1])
    return nested_partitions(neighbors, [num_clusters], seed, top)[num_clusters]


def graph_size_prior(neighbors: np.ndarray, num_clusters: int, seed: int = 0, shares=()) -> np.ndarray:
    """(C,) cluster shares the kNN graph suggests, for the KL-to-a-prior entropy term (cluster.size_prior=graph):
    the sizes of graph_partition, mixed with 10% of the uniform shares so no cluster is ruled out."""
    part = graph_partition(neighbors, num_clusters, seed)
    shares = np.bincount(part, minlength=num_clusters) / len(part)
    return (0.9 * shares + 0.1 / num_clusters).astype(np.float32)


# cluster.size_prior: the cluster shares the SCAN entropy term pulls towards, from (neighbours, C, seed,
# cluster.prior_shares); None = uniform (the plain entropy term)
SIZE_PRIORS: Registry = Registry("cluster.size_prior")
SIZE_PRIORS.add("uniform", lambda neighbors, num_clusters, seed, shares: None)
SIZE_PRIORS.add("graph", graph_size_prior)
SIZE_PRIORS.add("given", given_size_prior)
