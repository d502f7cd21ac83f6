"""lf.data: dataset_info.json registry -> canonical rows -> templates -> processors -> packing -> collators."""
