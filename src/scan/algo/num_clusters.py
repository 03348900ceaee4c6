"""How many clusters, without labels: the number whose partition the nearest neighbours support and
that recurs on subsamples; and how the clusters nest.

Two measures per candidate C, multiplied. The modularity of the partition on the directed kNN graph
(an image points at its K nearest neighbours): the share of neighbour pairs that fall in one cluster,
less the share a random partition with the same cluster sizes would keep together. Merging two real
kinds raises the chance share of a large cluster; splitting a kind cuts its inner pairs: both lower
it. Alone it splits a few big kinds (the gain of halving a cluster grows with its size), so it is
weighted by stability: the agreement (adjusted Rand index) of the partition with the one found on
random subsamples, high for boundaries between kinds and low for an arbitrary cut through one.
The partitions are spectral clusterings of the graph (k-means on the row-normalised leading
eigenvectors): one eigen-decomposition serves every C in the range.

The subsamples' kNN graphs are cut from one search of the whole set: a subsample's K nearest neighbours
are the first K that it kept of an image's 2K, so one search serves the whole choice (the search is
most of the time on high-dimensional features).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.sparse.linalg import ArpackError, eigsh
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from scan.algo.neighbors import l2_normalize, mine_neighbors, neighbor_agreement
from scan.core.errors import ConfigError
from scan.core.registry import Registry

# the range C is chosen from when the user gives none: 2 .. min(MAX_CLUSTERS, N / MIN_CLUSTER_SIZE)
MAX_CLUSTERS = 50
MIN_CLUSTER_SIZE = 20
# the stability half of the criterion: partitions of this many random subsamples of this share of the images
SUBSAMPLES = 3
SUBSAMPLE_SHARE = 0.8
# the neighbours searched per image, as a multiple of K, from which every subsample's K are taken: an image
# keeps each with probability SUBSAMPLE_SHARE, so fewer than K of 2K survive with probability ~1e-6 (K = 20)
NEIGHBOR_RESERVE = 2
# score = modularity x stability ** STABILITY_POWER: the square root keeps stability from overruling the
# modularity of small kinds, whose clusters recur less exactly (measured: benchmarks/num_clusters.py)
STABILITY_POWER = 0.5
PARTITION_FIT_ROWS = 3000
# the spectral embedding falls back to a dense eigen-solver up to this many images (a 4000 x 4000 matrix: 128 MB)
DENSE_EIGEN_LIMIT = 4000


def neighbor_modularity(assignments: np.ndarray, neighbors: np.ndarray) -> float:
    """Modularity of a partition on the directed kNN graph.

    Q = (1 / NK) Σ_i Σ_k [a_i = a_{n_ik}]  −  Σ_c p_c q_c,  with p_c = |{i : a_i = c}| / N the share of
    images (edge sources) in cluster c and q_c = |{(i, k) : a_{n_ik} = c}| / NK the share of neighbour
    slots (edge targets) pointing into it. assignments (N,) ints, neighbors (N, K) indices; Q in [-1, 1),
    0 for a partition that ignores the graph, 1 - 1/C for C equal, fully separated clusters.
    """
    a = np.asarray(assignments)
    nb = np.asarray(neighbors)
    c = int(a.max()) + 1
    p = np.bincount(a, minlength=c) / len(a)
    q = np.bincount(a[nb].ravel(), minlength=c) / nb.size
    return neighbor_agreement(a, nb) - float(p @ q)


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
    k-means (k-means++, 3 starts) fitted on at most PARTITION_FIT_ROWS of them, which ~200 partitions per
    choice (4 graphs x 49 values of C) need to stay within seconds for 10k images."""
    rows = l2_normalize(embedding[:, :num_clusters])
    fit = rows
    if len(rows) > PARTITION_FIT_ROWS:
        fit = rows[np.random.default_rng(seed).choice(len(rows), PARTITION_FIT_ROWS, replace=False)]
    return KMeans(num_clusters, n_init=3, random_state=seed).fit(fit).predict(rows)


def subsample_neighbors(neighbors: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray | None:
    """(len(rows), k) the k nearest neighbours of each kept image among the kept ones, in `rows` numbering.

    neighbors (N, K') every image's neighbours in the whole set, nearest first; rows: the kept images,
    sorted. An image's nearest kept neighbours are the first kept ones in its full list, so this equals a
    new search on the subsample (up to ties), without the search. None when some image kept fewer than k
    of its K' (then search again)."""
    position = np.full(len(neighbors), -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    mapped = position[neighbors[rows]]                       # (M, K') -1 where the neighbour was dropped
    kept = mapped >= 0
    if kept.sum(1).min() < k:
        return None
    first = np.argsort(~kept, axis=1, kind="stable")[:, :k]  # the kept columns, in their order
    return np.take_along_axis(mapped, first, axis=1)


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


def choose_num_clusters(features: np.ndarray, candidates, num_neighbors: int = 20, seed: int = 0,
                        subsamples: int = SUBSAMPLES) -> dict:
    """The number of clusters in `candidates` whose partition the neighbours support and that is reproducible.

    For each C the spectral partition of the kNN graph (features (N, D), cosine, `num_neighbors` each) gets
    score(C) = modularity(C) x stability(C) ** STABILITY_POWER: the neighbour modularity (which alone prefers
    splitting a few big kinds, its resolution limit) weighted by the mean adjusted Rand index between that
    partition and the one found the same way on each of `subsamples` random SUBSAMPLE_SHARE of the images (an
    arbitrary split of one kind does not recur; a boundary between kinds does). The highest score wins; a tie
    goes to the smaller C.
    Returns {"num_clusters", "curve": {C: score}, "modularity": {C: ...}, "stability": {C: ...}, "criterion"}.
    """
    candidates = sorted(set(int(c) for c in candidates))
    n = len(features)
    reserve = mine_neighbors(features, min(NEIGHBOR_RESERVE * num_neighbors, n - 1))   # nearest first
    neighbors = reserve[:, :num_neighbors]
    embedding = spectral_embedding(neighbors, max(candidates))
    full = {c: spectral_partition(embedding, c, seed) for c in candidates}
    modularity = {c: neighbor_modularity(full[c], neighbors) for c in candidates}
    rng = np.random.default_rng(seed)
    agreement = {c: [] for c in candidates}
    for _ in range(subsamples):
        rows = np.sort(rng.choice(n, int(SUBSAMPLE_SHARE * n), replace=False))
        k = min(num_neighbors, len(rows) - 1)
        part_neighbors = subsample_neighbors(reserve, rows, k)
        if part_neighbors is None:
            part_neighbors = mine_neighbors(features[rows], k)
        part_embedding = spectral_embedding(part_neighbors, max(candidates))
        for c in candidates:
            agreement[c].append(adjusted_rand_score(full[c][rows], spectral_partition(part_embedding, c, seed)))
    stability = {c: float(np.mean(agreement[c])) if agreement[c] else 1.0 for c in candidates}
    # an adjusted Rand index below 0 (agreement under chance) counts as none: its root would be complex
    curve = {c: modularity[c] * max(stability[c], 0.0) ** STABILITY_POWER for c in candidates}
    best = max(candidates, key=lambda c: (curve[c], -c))
    return {"num_clusters": best, "curve": curve, "modularity": modularity, "stability": stability,
            "criterion": "neighbor_modularity x subsample_stability"}


def merge_tree(assignments: np.ndarray, neighbors: np.ndarray, num_clusters: int | None = None) -> list[dict]:
    """The order in which clusters join as their number shrinks: greedy agglomeration on the kNN graph.

    Each step merges the two groups whose union raises the neighbour modularity most (the gain is
    (E_ab + E_ba) / NK − (p_a q_b + p_b q_a), E_ab the neighbour slots of a pointing into b), so the
    first merges join the clusters the neighbours link most, beyond what their sizes explain.
    Returns C − 1 steps {"merge": [group, group], "into": new group id, "gain": ΔQ}; the final clusters
    are groups 0..C−1 and step s creates group C + s (a SciPy-linkage-like numbering). O(C³) in all.
    """
    a = np.asarray(assignments)
    c = num_clusters or int(a.max()) + 1
    links = np.zeros((c, c))
    np.add.at(links, (np.repeat(a, neighbors.shape[1]), a[neighbors].ravel()), 1.0)
    links /= neighbors.size
    p = np.bincount(a, minlength=c) / len(a)
    q = links.sum(0)
    group = list(range(c))            # the group id each row of the matrices holds now
    active = np.ones(c, bool)
    steps = []
    for step in range(c - 1):
        gain = links + links.T - np.outer(p, q) - np.outer(q, p)
        gain[~active] = -np.inf
        gain[:, ~active] = -np.inf
        gain[np.tril_indices(c)] = -np.inf   # each pair once, i < j; ties go to the first pair
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        steps.append({"merge": sorted([group[i], group[j]]), "into": c + step, "gain": float(gain[i, j])})
        links[i] += links[j]
        links[:, i] += links[:, j]
        p[i] += p[j]
        q[i] += q[j]
        active[j] = False
        group[i] = c + step
    return steps


def given_size_prior(neighbors: np.ndarray, num_clusters: int, seed: int = 0, shares=()) -> np.ndarray:
    """(C,) the cluster shares the user knows (cluster.prior_shares, any positive scale), normalised to sum 1."""
    if len(shares) != num_clusters or min(shares, default=0) <= 0:
        raise ConfigError(f"cluster.size_prior=given needs cluster.prior_shares: {num_clusters} positive numbers, one "
                          f"per cluster (any scale, e.g. class counts), got {list(shares)}")
    values = np.asarray(shares, dtype=np.float64)
    return (values / values.sum()).astype(np.float32)


def graph_size_prior(neighbors: np.ndarray, num_clusters: int, seed: int = 0, shares=()) -> np.ndarray:
    """(C,) cluster shares the kNN graph suggests, for the KL-to-a-prior entropy term (cluster.size_prior=graph):
    the sizes of its spectral partition into C, mixed with 10% of the uniform shares so no cluster is ruled out."""
    part = spectral_partition(spectral_embedding(neighbors, num_clusters), num_clusters, seed)
    shares = np.bincount(part, minlength=num_clusters) / len(part)
    return (0.9 * shares + 0.1 / num_clusters).astype(np.float32)


# cluster.size_prior: the cluster shares the SCAN entropy term pulls towards, from (neighbours, C, seed,
# cluster.prior_shares); None = uniform (the plain entropy term)
SIZE_PRIORS: Registry = Registry("cluster.size_prior")
SIZE_PRIORS.add("uniform", lambda neighbors, num_clusters, seed, shares: None)
SIZE_PRIORS.add("graph", graph_size_prior)
SIZE_PRIORS.add("given", given_size_prior)
