"""Ask for a budget, get the best model: a Ray Tune search over distilled students and their
compression (`stage`), measured as served and chosen on validation (`budget`)."""
