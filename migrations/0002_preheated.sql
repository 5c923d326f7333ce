-- Which products were ever loaded into Redis, so a product that Redis no longer knows can be
-- told apart: never preheated (404) or lost by Redis (`recovering` until it is rebuilt).
alter table product add column if not exists preheated_at timestamptz;
