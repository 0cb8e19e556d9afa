"""The data layer: tables -> fitted encoders -> contiguous tensors -> batches."""
