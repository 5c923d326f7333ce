//! sea-orm entities for the `product`, `orders` and `rejection` tables.

pub mod product {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "product")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub product_id: i64,
        pub name: String,
        pub stock: i32,
        pub sold: i32,
        pub price_cents: i64,
        pub starts_at: ChronoDateTimeUtc,
        pub ends_at: ChronoDateTimeUtc,
        pub created_at: ChronoDateTimeUtc,
        /// Set when the product is first loaded into Redis (and at every preheat since).
        pub preheated_at: Option<ChronoDateTimeUtc>,
        /// Set when the ended, drained sale was retired from Redis (its keys expire); cleared
        /// by a new preheat.
        pub retired_at: Option<ChronoDateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod orders {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    /// An order's status in Postgres (`orders_status_check`). Names are snake_case both in
    /// SQL and JSON.
    #[derive(
        Clone,
        Copy,
        Debug,
        PartialEq,
        Eq,
        EnumIter,
        DeriveActiveEnum,
        Serialize,
        Deserialize,
        utoipa::ToSchema,
    )]
    #[sea_orm(rs_type = "String", db_type = "Text", rename_all = "snake_case")]
    #[serde(rename_all = "snake_case")]
    pub enum OrderStatus {
        /// Awaiting payment until `expires_at`.
        PendingPayment,
        Paid,
        Cancelled,
        Expired,
    }

    impl std::fmt::Display for OrderStatus {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.to_value())
        }
    }

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub order_id: Uuid,
        pub reservation_id: Uuid,
        pub user_id: i64,
        pub product_id: i64,
        pub status: OrderStatus,
        pub reserved_at: ChronoDateTimeUtc,
        pub created_at: ChronoDateTimeUtc,
        pub expires_at: ChronoDateTimeUtc,
        pub paid_at: Option<ChronoDateTimeUtc>,
        pub closed_at: Option<ChronoDateTimeUtc>,
        pub released_at: Option<ChronoDateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod rejection {
    use sea_orm::entity::prelude::*;

    /// A win that could not become an order (terminal; see `migrations/0003_rejection.sql`).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "rejection")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub reservation_id: Uuid,
        pub user_id: i64,
        pub product_id: i64,
        /// Why, in plain words, for the shopper.
        pub reason: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
