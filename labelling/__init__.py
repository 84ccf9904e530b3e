"""Label quality: the blind review tool that writes labels/reviews.csv."""
